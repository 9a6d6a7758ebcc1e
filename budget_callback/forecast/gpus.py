"""Accelerators by name: dense peak FLOP/s and memory, each figure sourced.

Lightning's ``lightning.fabric.utilities.throughput._CUDA_FLOPS`` is used when a
GPU is actually present (``get_available_flops``); for planning without one we
keep this table because we need memory sizes too, and because Lightning's
entries mix dense and sparse figures (its ``h200 sxm1`` bf16 entry, 2e15, is
the with-sparsity number). Every figure here is **dense** (no 2:4 sparsity).
Memory is what ``nvidia-smi --query-gpu=memory.total`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    flops: dict  # torch dtype name -> dense peak FLOP/s
    source: str

    def peak_flops(self, dtype: str) -> float:
        """Dense peak for ``dtype`` (a torch dtype name); a dtype the table lacks gets the float32 figure."""
        return self.flops.get(dtype, self.flops["float32"])


GPUS: dict[str, GPU] = {
    "h100-sxm": GPU(
        "h100-sxm", 81_559 * MIB,
        {"float64": 66.9e12, "float32": 66.9e12, "tfloat32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12},
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5; sparse figures halved; float64: FP64 Tensor Core)",
    ),
    "h100-pcie": GPU(
        "h100-pcie", 81_559 * MIB,
        {"float64": 51.2e12, "float32": 51.2e12, "tfloat32": 378.0e12, "bfloat16": 756.0e12, "float16": 756.0e12},
        "NVIDIA H100 Tensor Core GPU datasheet (PCIe; sparse figures halved; float64: FP64 Tensor Core)",
    ),
    "h200": GPU(
        "h200", 143_771 * MIB,
        {"float64": 67.0e12, "float32": 67.0e12, "tfloat32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12},
        "NVIDIA H200 Tensor Core GPU datasheet (SXM; 1,979 TFLOPS bf16 with sparsity, halved)",
    ),
    "a100-80gb": GPU(
        "a100-80gb", 81_920 * MIB,
        {"float64": 19.5e12, "float32": 19.5e12, "tfloat32": 156.0e12, "bfloat16": 312.0e12, "float16": 312.0e12},
        "NVIDIA A100 Tensor Core GPU datasheet (dense; float64: FP64 Tensor Core)",
    ),
    "a100-40gb": GPU(
        "a100-40gb", 40_960 * MIB,
        {"float64": 19.5e12, "float32": 19.5e12, "tfloat32": 156.0e12, "bfloat16": 312.0e12, "float16": 312.0e12},
        "NVIDIA A100 Tensor Core GPU datasheet (dense; float64: FP64 Tensor Core)",
    ),
    "l4": GPU(
        "l4", 23_034 * MIB,
        {"float64": 30.3e12 / 64, "float32": 30.3e12, "tfloat32": 60.0e12, "bfloat16": 121.0e12, "float16": 121.0e12},
        "NVIDIA L4 datasheet (sparse figures halved); float64 at 1/64 of float32 (NVIDIA Ada GPU architecture whitepaper)",
    ),
}
GPUS["h100"] = GPUS["h100-sxm"]


def gpu(name: str) -> GPU:
    key = name.lower().replace("_", "-").replace(" ", "-")
    if key not in GPUS:
        raise ValueError(f"`gpu` must be one of {', '.join(GPUS)}, got {name!r}")
    return GPUS[key]
