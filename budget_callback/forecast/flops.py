"""FLOPs and time: itemised forward FLOPs (nanoGPT's ``flops()``), backward = 2x,
the PaLM formula as a cross-check, optimizer FLOPs, MFU and training time.

A multiply-add counts as 2 FLOPs. Attention FLOPs are counted for the full
T x T score matrix (as nanoGPT and PaLM do), not halved for causality.
"""

from __future__ import annotations

from .params import count_params
from .shapes import ModelShape

# AdamW per parameter: m = b1*m + (1-b1)*g (3), v = b2*v + (1-b2)*g*g (4),
# p -= lr * m_hat / (sqrt(v_hat) + eps) (5), decoupled weight decay (1).
ADAMW_FLOPS_PER_PARAM = 13
SGD_FLOPS_PER_PARAM = {False: 2, True: 4}  # without / with momentum


def forward_flops(shape: ModelShape, seq_len: int) -> dict[str, int]:
    """Forward FLOPs for one sequence of ``seq_len`` tokens, itemised; parts sum to ``total``."""
    T, D, L, F = seq_len, shape.d_model, shape.n_layer, shape.mlp_hidden
    out = {
        "attention/qkv": L * 2 * T * D * (shape.q_dim + 2 * shape.kv_dim),
        "attention/scores": L * 2 * T * T * shape.q_dim,
        "attention/reduce": L * 2 * T * T * shape.q_dim,
        "attention/proj": L * 2 * T * shape.q_dim * D,
        "mlp/in": L * 2 * T * D * F * (2 if shape.mlp == "gated" else 1),
        "mlp/out": L * 2 * T * F * D,
        "head": 2 * T * D * shape.vocab_size,
    }
    out["total"] = sum(out.values())
    return out


def palm_flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """PaLM (Chowdhery et al. 2022, App. B): 6N + 12*L*H*Q*T per token, N without embeddings."""
    p = count_params(shape)
    n = p["total"] - p["embedding/position"] - (p["embedding/token"] if not shape.tied else 0)
    return 6 * n + 12 * shape.n_layer * shape.n_head * shape.hd * seq_len


def optimizer_flops(n_params: int, optimizer: str = "adamw", momentum: float = 0.0) -> int:
    if optimizer in ("adamw", "adam"):
        return ADAMW_FLOPS_PER_PARAM * n_params
    return SGD_FLOPS_PER_PARAM[bool(momentum)] * n_params


def train_flops_per_step(shape: ModelShape, seq_len: int, sequences_per_step: int) -> dict[str, int]:
    """Forward + backward (2x forward) for the global batch of one optimizer step."""
    fwd = forward_flops(shape, seq_len)["total"] * sequences_per_step
    return {"forward": fwd, "backward": 2 * fwd, "total": 3 * fwd}


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' dense peak."""
    return flops_per_step / step_seconds / (peak_flops_per_device * devices)


def train_seconds(total_flops: float, peak_flops_per_device: float, devices: int, mfu_: float) -> float:
    """Wall time for ``total_flops`` on ``devices`` at utilisation ``mfu_``."""
    return total_flops / (peak_flops_per_device * devices * mfu_)
