"""Transformer shapes: one dataclass, presets by name.

GPT-2 family follows nanoGPT's ``GPTConfig`` / the transformer-sizing notebook
(learned positions, LayerNorm with bias, biases in every linear, attention
included, tied embeddings). LLaMA and Gemma use RMSNorm, a gated MLP,
grouped-query attention, rotary positions (no parameters) and no biases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..validate import one_of, positive_int

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gated")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int  # V: rows of the unembedding W (V x D)
    d_model: int  # D: hidden size
    n_layer: int  # L: transformer blocks
    n_head: int  # H: query heads
    n_kv_head: int | None = None  # KV heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # per-head size; None: d_model // n_head
    d_mlp: int | None = None  # MLP hidden size; None: 4 * d_model
    n_ctx: int = 1024  # context length (size of the learned position table)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" (2 matrices) | "gated" (3 matrices: gate, up, down)
    bias: bool = True  # biases in attention and MLP linears
    norm_bias: bool = True  # LayerNorm has a bias
    learned_pos: bool = True  # learned position embedding (n_ctx x D)
    tied: bool = True  # head shares the token embedding
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layer", "n_head", "n_ctx"):
            positive_int(field, getattr(self, field))
        for field in ("n_kv_head", "head_dim", "d_mlp"):
            positive_int(field, getattr(self, field), optional=True)
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"`n_head` ({self.n_head}) must divide `d_model` ({self.d_model}) unless `head_dim` is given"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"`n_kv_head` ({self.kv_heads}) must divide `n_head` ({self.n_head})")
        one_of("norm", self.norm, NORMS)
        one_of("mlp", self.mlp, MLPS)

    # derived sizes -----------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return self.d_mlp or 4 * self.d_model

    @property
    def q_dim(self) -> int:
        return self.n_head * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> ModelShape:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _gpt2(name: str, d_model: int, n_layer: int, n_head: int, vocab_size: int = 50257, n_ctx: int = 1024) -> ModelShape:
    return ModelShape(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head, n_ctx=n_ctx, name=name)


PRESETS: dict[str, ModelShape] = {
    # The data-rate calculator's model: V=10,000, D=64, 2 layers, 2 heads (the calculator names no context; 256 here).
    "gpt2-tiny": _gpt2("gpt2-tiny", 64, 2, 2, vocab_size=10_000, n_ctx=256),
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 48, 25),
    # Meta-Llama-3-8B config.json
    "llama-3-8b": ModelShape(
        vocab_size=128_256, d_model=4096, n_layer=32, n_head=32, n_kv_head=8, d_mlp=14_336, n_ctx=8192,
        norm="rmsnorm", mlp="gated", bias=False, norm_bias=False, learned_pos=False, tied=False, name="llama-3-8b",
    ),
    # google/gemma-2b config.json (multi-query attention, head_dim 256, tied head)
    "gemma-2b": ModelShape(
        vocab_size=256_000, d_model=2048, n_layer=18, n_head=8, n_kv_head=1, head_dim=256, d_mlp=16_384, n_ctx=8192,
        norm="rmsnorm", mlp="gated", bias=False, norm_bias=False, learned_pos=False, tied=True, name="gemma-2b",
    ),
}

# Parameter counts published for the released checkpoints (HF model cards /
# sum of numel over the checkpoint's tensors, tied weights once).
PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-3-8b": 8_030_261_248,
    "gemma-2b": 2_506_172_416,
}


def preset(name: str, **overrides) -> ModelShape:
    """Shape by preset name, with optional field overrides (litgpt's ``Config.from_name``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides)
