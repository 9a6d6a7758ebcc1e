"""ModelShape: derived sizes, checks that name the argument, presets equal to the released configs, and the
published parameter counts reproduced from the preset's fields by the textbook formulas."""

from dataclasses import FrozenInstanceError

import pytest

from budget_callback.forecast.shapes import PRESETS, PUBLISHED_PARAMS, ModelShape, preset


@pytest.mark.parametrize("kwargs, kv_heads, hd, mlp_hidden, q_dim, kv_dim", [
    (dict(vocab_size=10, d_model=768, n_layer=1, n_head=12), 12, 64, 3072, 768, 768),
    (dict(vocab_size=10, d_model=4096, n_layer=1, n_head=32, n_kv_head=8, d_mlp=14_336), 8, 128, 14_336, 4096, 1024),
    (dict(vocab_size=10, d_model=2048, n_layer=1, n_head=8, n_kv_head=1, head_dim=256), 1, 256, 8192, 2048, 256),
    (dict(vocab_size=10, d_model=10, n_layer=1, n_head=3, head_dim=7), 3, 7, 40, 21, 21),  # head_dim: no divisibility
])
def test_derived_sizes(kwargs, kv_heads, hd, mlp_hidden, q_dim, kv_dim):
    s = ModelShape(**kwargs)
    assert (s.kv_heads, s.hd, s.mlp_hidden, s.q_dim, s.kv_dim) == (kv_heads, hd, mlp_hidden, q_dim, kv_dim)


BASE = dict(vocab_size=100, d_model=64, n_layer=2, n_head=4)


@pytest.mark.parametrize("override, message", [
    (dict(vocab_size=0), "`vocab_size` must be a positive integer, got 0"),
    (dict(d_model=-1), "`d_model` must be a positive integer, got -1"),
    (dict(n_layer=1.5), "`n_layer` must be a positive integer, got 1.5"),
    (dict(n_head=True), "`n_head` must be a positive integer, got True"),
    (dict(n_ctx=0), "`n_ctx` must be a positive integer, got 0"),
    (dict(n_kv_head=0), "`n_kv_head` must be a positive integer or None, got 0"),
    (dict(head_dim=0), "`head_dim` must be a positive integer or None, got 0"),
    (dict(d_mlp="4x"), "`d_mlp` must be a positive integer or None, got '4x'"),
    (dict(n_head=5), r"`n_head` \(5\) must divide `d_model` \(64\) unless `head_dim` is given"),
    (dict(n_kv_head=3), r"`n_kv_head` \(3\) must divide `n_head` \(4\)"),
    (dict(norm="batchnorm"), "`norm` must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (dict(mlp="relu"), "`mlp` must be one of gelu, gated, got 'relu'"),
])
def test_bad_fields_are_refused_naming_the_argument(override, message):
    with pytest.raises(ValueError, match=message):
        ModelShape(**{**BASE, **override})


# The released configs (Hugging Face config.json of each checkpoint).
GPT2 = dict(vocab_size=50_257, n_ctx=1024, norm="layernorm", mlp="gelu", bias=True, norm_bias=True, learned_pos=True,
            tied=True)
RELEASED = {
    # openai-community/gpt2*: n_embd, n_layer, n_head (n_positions 1024, vocab 50257, tied lm_head)
    "gpt2": dict(GPT2, d_model=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(GPT2, d_model=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(GPT2, d_model=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(GPT2, d_model=1600, n_layer=48, n_head=25),
    # meta-llama/Meta-Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
    # vocab 128256, max_position_embeddings 8192, tie_word_embeddings false, RMSNorm, SiLU gate, no biases
    "llama-3-8b": dict(vocab_size=128_256, d_model=4096, n_layer=32, n_head=32, kv_heads=8, hd=128, mlp_hidden=14_336,
                       n_ctx=8192, norm="rmsnorm", mlp="gated", bias=False, learned_pos=False, tied=False),
    # google/gemma-2b: hidden 2048, intermediate 16384, 18 layers, 8 heads, 1 KV head, head_dim 256,
    # vocab 256000, max_position_embeddings 8192, tied embeddings, RMSNorm, GeGLU gate, no biases
    "gemma-2b": dict(vocab_size=256_000, d_model=2048, n_layer=18, n_head=8, kv_heads=1, hd=256, mlp_hidden=16_384,
                     n_ctx=8192, norm="rmsnorm", mlp="gated", bias=False, learned_pos=False, tied=True),
    # the data-rate calculator's model (README): V=10,000, D=64, 2 layers, 2 heads
    "gpt2-tiny": dict(vocab_size=10_000, d_model=64, n_layer=2, n_head=2, n_ctx=256, tied=True),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_presets_are_the_released_configs(name):
    s = preset(name)
    assert {k: getattr(s, k) for k in RELEASED[name]} == RELEASED[name]
    assert s.name == name


def test_every_preset_is_covered_here():
    assert set(PRESETS) == set(RELEASED)


# Parameter counts of the released checkpoints (sum of numel over the checkpoint's tensors, tied weights once),
# as the model cards / safetensors index publish them.
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-3-8b": 8_030_261_248,
    "gemma-2b": 2_506_172_416,
}


def _textbook_count(s: ModelShape) -> int:
    """Written out per architecture from the papers' block diagrams, not from count_params."""
    D, V, L = s.d_model, s.vocab_size, s.n_layer
    if s.name.startswith("gpt2"):
        # wte + wpe + L * (ln_1 + c_attn + c_proj + ln_2 + c_fc + c_proj) + ln_f  (nanoGPT transformer_sizing)
        layer = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (4 * D * D + 4 * D) + (4 * D * D + D)
        return V * D + s.n_ctx * D + L * layer + 2 * D
    # embed (+ untied lm_head) + L * (2 RMSNorm weights + q, k, v, o + gate, up, down) + final norm
    q, kv, F = s.n_head * s.hd, s.kv_heads * s.hd, s.mlp_hidden
    layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F
    return V * D * (1 if s.tied else 2) + L * layer + D


def test_published_counts_are_the_published_figures():
    assert PUBLISHED_PARAMS == PUBLISHED


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_fields_reproduce_the_published_count(name):
    assert _textbook_count(PRESETS[name]) == PUBLISHED[name]


def test_preset_overrides_and_none_means_keep():
    s = preset("gpt2", n_layer=2, d_model=None, tied=False)
    assert (s.n_layer, s.d_model, s.tied, s.vocab_size) == (2, 768, False, 50_257)
    assert preset("gpt2") == PRESETS["gpt2"] and PRESETS["gpt2"].n_layer == 12  # the preset itself is unchanged
    with pytest.raises(ValueError, match="`n_head`"):
        preset("gpt2", n_head=7)  # overrides are validated like any shape


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        preset("gpt5")
    assert "'gpt5'" in str(err.value) and all(name in str(err.value) for name in PRESETS)


def test_shapes_are_frozen_and_round_trip_through_a_dict():
    s = preset("llama-3-8b")
    with pytest.raises(FrozenInstanceError):
        s.n_layer = 1
    assert ModelShape(**s.to_dict()) == s
