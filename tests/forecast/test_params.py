import pytest
import torch

from budget_callback.models.gpt import GPT
from budget_callback.forecast.params import count_params
from budget_callback.forecast.shapes import PRESETS, PUBLISHED_PARAMS, ModelShape, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_equals_module_built_on_meta(name):
    shape = PRESETS[name]
    with torch.device("meta"):
        model = GPT(shape)
    assert count_params(shape)["total"] == sum(p.numel() for p in model.parameters())  # shared tensors once


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_analytic_count_equals_published_figure(name):
    assert count_params(PRESETS[name])["total"] == PUBLISHED_PARAMS[name]


def test_breakdown_parts_sum_to_total_and_tied_head_counted_once():
    p = count_params(preset("gpt2"))
    assert sum(v for k, v in p.items() if k != "total") == p["total"]
    assert p["head"] == 0
    untied = count_params(preset("gpt2", tied=False))
    assert untied["total"] - p["total"] == 50257 * 768


def test_gpt2_small_hand_count():
    # nanoGPT transformer_sizing: wte + wpe + 12 * (2 LN + c_attn + c_proj + 2 LN + fc + proj) + ln_f
    D, V = 768, 50257
    layer = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    assert count_params(preset("gpt2"))["total"] == V * D + 1024 * D + 12 * layer + 2 * D


