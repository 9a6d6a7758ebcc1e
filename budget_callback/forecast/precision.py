"""Lightning precision and optimizer settings, as the byte sizes the forecasts need."""

from __future__ import annotations

from dataclasses import dataclass

# Lightning's aliases, normalised as ``lightning.fabric.connector`` does.
_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: int  # bytes per stored parameter (and gradient, optimizer moment)
    compute_bytes: int  # bytes per activation element inside matmuls
    residual_bytes: int  # bytes per element of the residual stream / norm inputs
    autocast: bool  # 16-bit copies of the matmul weights live during forward+backward
    torch_dtype: str  # dtype of the matmuls, for the GPU FLOPs table


PRECISIONS = {
    "32-true": Precision("32-true", 4, 4, 4, False, "float32"),
    "16-mixed": Precision("16-mixed", 4, 2, 4, True, "float16"),
    "bf16-mixed": Precision("bf16-mixed", 4, 2, 4, True, "bfloat16"),
    "16-true": Precision("16-true", 2, 2, 2, False, "float16"),
    "bf16-true": Precision("bf16-true", 2, 2, 2, False, "bfloat16"),
    "64-true": Precision("64-true", 8, 8, 8, False, "float64"),
}

OPTIMIZERS = ("adamw", "adam", "sgd")
OPTIMIZER_IMPLS = ("foreach", "fused", "for-loop")
STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


def normalise(name: str | int) -> str:
    """Lightning's spelling of a precision (``16`` -> ``16-mixed``, ``"64"`` -> ``64-true``)."""
    return _ALIASES.get(str(name), str(name))


def precision(name: str | int) -> Precision:
    key = normalise(name)
    if key not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[key]


def optimizer_states_per_param(optimizer: str, momentum: float = 0.0) -> int:
    """Optimizer state tensors per parameter (same dtype as the parameter)."""
    if optimizer in ("adamw", "adam"):
        return 2
    if optimizer == "sgd":
        return 1 if momentum else 0
    raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


