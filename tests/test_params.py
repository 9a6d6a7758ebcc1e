import pytest
import torch

from budget_callback.gpt import GPT
from budget_callback.params import count_params, module_params
from budget_callback.shapes import PRESETS, PUBLISHED_PARAMS, ModelShape, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_count_equals_module_built_on_meta(name):
    shape = PRESETS[name]
    with torch.device("meta"):
        model = GPT(shape)
    assert count_params(shape)["total"] == module_params(model)["total"]


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


def test_module_params_counts_shared_and_frozen_once():
    model = GPT(ModelShape(vocab_size=50, d_model=8, n_layer=1, n_head=2, n_ctx=8))
    model.wpe.weight.requires_grad_(False)
    counts = module_params(model)
    assert counts["frozen"] == 8 * 8
    assert counts["total"] == count_params(model.shape)["total"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_head": 5}, "`n_head`"), ({"d_model": 0}, "`d_model`"), ({"n_kv_head": 5}, "`n_kv_head`"),
     ({"norm": "batchnorm"}, "`norm`"), ({"vocab_size": -3}, "`vocab_size`")],
)
def test_bad_shapes_name_the_argument(kwargs, match):
    base = dict(vocab_size=100, d_model=64, n_layer=2, n_head=4)
    with pytest.raises(ValueError, match=match):
        ModelShape(**{**base, **kwargs})


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2-xl"):
        preset("gpt-5")
