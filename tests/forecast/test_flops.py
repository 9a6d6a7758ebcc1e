import pytest

from budget_callback.forecast.flops import forward_flops, mfu, palm_flops_per_token, train_flops_per_step, train_seconds
from budget_callback.forecast.gpus import gpu
from budget_callback.forecast.shapes import preset


def test_forward_flops_hand_derived():
    s = preset("gpt2-tiny")  # D=64, L=2, V=10,000
    T, D, L, V = 256, 64, 2, 10_000
    expected = L * (2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * 4 * D) + 2 * T * D * V
    f = forward_flops(s, T)
    assert f["total"] == expected == sum(v for k, v in f.items() if k != "total")


def test_backward_is_twice_forward_and_palm_agrees():
    s = preset("gpt2")
    step = train_flops_per_step(s, 1024, 8)
    assert step["backward"] == 2 * step["forward"] and step["total"] == 3 * step["forward"]
    palm = palm_flops_per_token(s, 1024) * 1024 * 8
    assert abs(palm - step["total"]) / palm < 0.01


def test_time_and_mfu_roundtrip():
    peak = gpu("h100").peak_flops("bfloat16")
    assert peak == 989.4e12
    seconds = train_seconds(1e18, peak, 8, 0.4)
    assert mfu(1e18, seconds, peak, 8) == pytest.approx(0.4)
