"""Parameter counts: analytic from a :class:`ModelShape`, exact from a module."""

from __future__ import annotations

from .shapes import ModelShape


def count_params(shape: ModelShape) -> dict[str, int]:
    """Itemised parameter count (nanoGPT's ``params()`` layout); parts sum to ``total``.

    Tied embeddings are counted once (``head`` is 0 when tied).
    """
    D, L, V = shape.d_model, shape.n_layer, shape.vocab_size
    b = 1 if shape.bias else 0
    norm = D * (2 if shape.norm == "layernorm" and shape.norm_bias else 1)
    F = shape.mlp_hidden
    out = {
        "embedding/token": V * D,
        "embedding/position": shape.n_ctx * D if shape.learned_pos else 0,
        "attention/norm": L * norm,
        "attention/qkv": L * (D * (shape.q_dim + 2 * shape.kv_dim) + b * (shape.q_dim + 2 * shape.kv_dim)),
        "attention/proj": L * (shape.q_dim * D + b * D),
        "mlp/norm": L * norm,
        "mlp/in": L * ((2 if shape.mlp == "gated" else 1) * (D * F + b * F)),
        "mlp/out": L * (F * D + b * D),
        "final_norm": norm,
        "head": 0 if shape.tied else V * D,
    }
    out["total"] = sum(out.values())
    return out


def layer_params(shape: ModelShape) -> int:
    """Parameters of one transformer block."""
    p = count_params(shape)
    return sum(p[k] for k in ("attention/norm", "attention/qkv", "attention/proj", "mlp/norm", "mlp/in", "mlp/out")) // shape.n_layer


def matmul_params(shape: ModelShape) -> int:
    """Parameters that feed matmuls (cast to 16-bit by autocast): linears and the head."""
    p = count_params(shape)
    return p["attention/qkv"] + p["attention/proj"] + p["mlp/in"] + p["mlp/out"] + shape.vocab_size * shape.d_model
