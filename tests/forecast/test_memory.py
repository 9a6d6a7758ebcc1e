from dataclasses import replace

import pytest

from budget_callback.forecast.memory import (TrainSetup, activation_bytes, layer_activation_bytes, max_batch_size,
                                    memory_phases, min_devices, peak_memory)
from budget_callback.forecast.params import count_params
from budget_callback.forecast.precision import precision
from budget_callback.forecast.shapes import ModelShape, preset

SMALL = ModelShape(vocab_size=100, d_model=8, n_layer=2, n_head=2, n_ctx=4)


def test_layer_activations_hand_derived_bf16_mixed_flash():
    # B=2, T=4, D=8, H=2: per element bytes: fp32 norm inputs (2 x 4), bf16 copies:
    # qkv input 2, q/k/v 6, attn out 2 (SDPA's saved output IS the projection's input: once) + fp32 logsumexp,
    # fc input 2, fc out + gelu out 2 x 2 x 4D
    BT, D = 8, 8
    expected = (4 * BT * D + 2 * 4 * BT) * 2 + 2 * BT * D + 2 * BT * 3 * D + (2 * BT * D + 4 * 2 * 2 * 4) \
        + 2 * BT * D + 2 * 2 * BT * 4 * D
    got = layer_activation_bytes(SMALL, 2, 4, precision("bf16-mixed"), flash=True)
    assert got["total"] == expected == sum(v for k, v in got.items() if k != "total")


def test_materialised_attention_adds_scores():
    flash = layer_activation_bytes(SMALL, 2, 4, precision("bf16-mixed"), flash=True)["total"]
    full = layer_activation_bytes(SMALL, 2, 4, precision("bf16-mixed"), flash=False)["total"]
    # fp32 softmax + bf16 copy (B*H*T*T) instead of flash attention's fp32 logsumexp (B*H*T)
    assert full - flash == (4 + 2) * 2 * 2 * 4 * 4 - 4 * 2 * 2 * 4


def test_logits_are_counted_and_dominate_gpt2_small():
    acts = activation_bytes(preset("gpt2"), TrainSetup(micro_batch_size=8, precision="bf16-mixed"))
    assert acts["logits"] == 3 * 4 * 8 * 1024 * 50257
    assert acts["logits"] > 0.25 * acts["layers"]


def test_model_state_32_true_adamw_hand_derived():
    n = count_params(SMALL)["total"]
    phases = memory_phases(SMALL, TrainSetup(micro_batch_size=2, precision="32-true"))
    step = phases["optimizer_step"]
    assert step["params"] == 4 * n and step["gradients"] == 4 * n
    assert step["optimizer"] == 8 * n + 4 * n  # two moments + foreach sqrt temporaries
    fused = memory_phases(SMALL, TrainSetup(precision="32-true", optimizer_impl="fused"))["optimizer_step"]
    assert fused["optimizer"] == 8 * n


def test_bf16_mixed_keeps_fp32_master_and_autocast_copies():
    shape = preset("gpt2")
    n = count_params(shape)["total"]
    fb = memory_phases(shape, TrainSetup(precision="bf16-mixed"))["forward_backward"]
    assert fb["params"] == 4 * n and fb["optimizer"] == 8 * n
    assert fb["other"] > 2 * 85_000_000  # bf16 copies of every matmul weight, head included
    true16 = memory_phases(shape, TrainSetup(precision="bf16-true"))["forward_backward"]
    assert true16["params"] == 2 * n and true16["optimizer"] == 4 * n and true16["other"] == 0


def test_sgd_states():
    n = count_params(SMALL)["total"]
    plain = memory_phases(SMALL, TrainSetup(optimizer="sgd", precision="32-true"))["optimizer_step"]
    assert plain["optimizer"] == 0
    mom = memory_phases(SMALL, TrainSetup(optimizer="sgd", momentum=0.9, precision="32-true", optimizer_impl="fused"))
    assert mom["optimizer_step"]["optimizer"] == 4 * n


def test_grad_accumulation_keeps_grads_during_forward():
    one = memory_phases(SMALL, TrainSetup(precision="32-true"))["forward_backward"]
    acc = memory_phases(SMALL, TrainSetup(precision="32-true", grad_accum=4))["forward_backward"]
    assert one["gradients"] == 0 and acc["gradients"] == 4 * count_params(SMALL)["total"]


def test_strategies_shard_as_documented():
    shape = preset("gpt2-xl")
    n = count_params(shape)["total"]
    base = TrainSetup(precision="bf16-mixed", devices=8)
    ddp = peak_memory(shape, base)["phases"]["optimizer_step"]
    fsdp = peak_memory(shape, replace(base, strategy="fsdp"))["phases"]["optimizer_step"]
    z1 = peak_memory(shape, replace(base, strategy="deepspeed_stage_1"))["phases"]["optimizer_step"]
    z2 = peak_memory(shape, replace(base, strategy="deepspeed_stage_2"))["phases"]["optimizer_step"]
    z3 = peak_memory(shape, replace(base, strategy="deepspeed_stage_3"))["phases"]["optimizer_step"]
    assert ddp["params"] == 4 * n and fsdp["params"] == 4 * n // 8
    assert z1["params"] == 2 * n and z1["gradients"] == 2 * n and z1["optimizer"] == 12 * n // 8
    assert z2["gradients"] == 2 * n // 8 and z3["params"] == 2 * n // 8


def test_peak_is_the_larger_phase_and_parts_sum():
    m = peak_memory(preset("gpt2"), TrainSetup(micro_batch_size=4, precision="bf16-mixed"))
    phases = m["phases"]
    assert m["peak_bytes"] == max(p["total"] for p in phases.values())
    parts = ("params_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
    assert sum(m[k] for k in parts) == m["peak_bytes"]


def test_activation_checkpointing_reduces_activations():
    base = TrainSetup(micro_batch_size=8, precision="bf16-mixed")
    full = activation_bytes(preset("gpt2"), base)["layers"]
    ckpt = activation_bytes(preset("gpt2"), replace(base, activation_checkpointing=True))["layers"]
    assert ckpt < full / 4


def test_max_batch_size_is_largest_that_fits():
    shape, setup = preset("gpt2"), TrainSetup(precision="bf16-mixed")
    budget = 80 * 1024**3
    b = max_batch_size(shape, setup, budget)
    assert peak_memory(shape, setup, batch=b)["peak_bytes"] <= budget < peak_memory(shape, setup, batch=b + 1)["peak_bytes"]
    assert max_batch_size(shape, setup, 10**6) is None


def test_min_devices():
    shape = preset("llama-3-8b")
    budget = 80 * 1024**3
    fsdp = TrainSetup(precision="bf16-mixed", strategy="fsdp", seq_len=2048)
    w = min_devices(shape, fsdp, budget)
    assert w is not None and w > 1
    assert peak_memory(shape, replace(fsdp, devices=w), )["peak_bytes"] <= budget
    assert peak_memory(shape, replace(fsdp, devices=w - 1))["peak_bytes"] > budget
    assert min_devices(shape, replace(fsdp, strategy="ddp"), budget) is None


@pytest.mark.parametrize("field, value", [("micro_batch_size", 0), ("devices", -1), ("precision", "fp8"),
                                          ("strategy", "horovod"), ("optimizer", "lion")])
def test_setup_validation_names_argument(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TrainSetup(**{field: value})
