"""The accelerator table: every figure dense and equal to what NVIDIA publishes; memory as nvidia-smi reports it;
names looked up loosely, unknown names refused with the list."""

import pytest
import torch
from lightning.fabric.utilities.throughput import _CUDA_FLOPS

from budget_callback.forecast.gpus import GPUS, MIB, gpu

T = 1e12
DTYPES = ("float32", "tfloat32", "bfloat16", "float16", "float64")

# The datasheets the module cites (TFLOPS). Tensor-core figures are printed "with sparsity" (twice the dense rate,
# marked *); halved here. FP32 is the non-tensor figure.
#   NVIDIA H100 Tensor Core GPU datasheet: SXM  FP32 67, TF32 989*, BF16 1,979*, FP16 1,979*
#                                          PCIe FP32 51, TF32 756*, BF16 1,513*, FP16 1,513*
#   NVIDIA H200 Tensor Core GPU datasheet: SXM  FP32 67, TF32 989*, BF16 1,979*, FP16 1,979*
#   NVIDIA A100 Tensor Core GPU datasheet:      FP32 19.5, TF32 156, BF16 312, FP16 312 (dense; 312*/624* sparse)
#   NVIDIA L4 datasheet:                        FP32 30.3, TF32 120*, BF16 242*, FP16 242*
# FP64: the FP64 Tensor Core figure (what cuBLAS's DGEMM runs on): H100 SXM 67, PCIe 51, H200 67, A100 19.5; the L4
# has no FP64 tensor cores and runs FP64 at 1/64 of FP32 (NVIDIA Ada GPU architecture whitepaper).
DATASHEET = {
    "h100-sxm": (67, 989 / 2, 1979 / 2, 1979 / 2, 67),
    "h100-pcie": (51, 756 / 2, 1513 / 2, 1513 / 2, 51),
    "h200": (67, 989 / 2, 1979 / 2, 1979 / 2, 67),
    "a100-80gb": (19.5, 156, 312, 312, 19.5),
    "a100-40gb": (19.5, 156, 312, 312, 19.5),
    "l4": (30.3, 120 / 2, 242 / 2, 242 / 2, 30.3 / 64),
}

# nvidia-smi --query-gpu=memory.total (MiB), as printed on real machines: "NVIDIA H100 80GB HBM3 ... 81559MiB"
# (NVIDIA/nccl#1264; modal-labs/modal-client#2797, which also lists A100 80GB 81920MiB, A100 40GB 40960MiB,
# L4 23034MiB); "NVIDIA H200 ... 143771MiB" (nvidia-smi tables in several public write-ups).
NVIDIA_SMI_MIB = {"h100-sxm": 81_559, "h200": 143_771, "a100-80gb": 81_920, "a100-40gb": 40_960, "l4": 23_034}

# Lightning's table (same datasheets): its entries for these GPUs are the dense figures, to the digit.
LIGHTNING_DENSE = {"h100-sxm": "h100 sxm", "h100-pcie": "h100 pcie", "a100-80gb": "a100", "a100-40gb": "a100",
                   "l4": "l4"}
LIGHTNING_DTYPE = {"float32": torch.float32, "tfloat32": "tfloat32", "bfloat16": torch.bfloat16,
                   "float16": torch.float16}


@pytest.mark.parametrize("name", list(DATASHEET))
def test_dense_peaks_are_the_datasheet_figures(name):
    """Within the datasheets' own rounding (whole TFLOPS, e.g. H100 SXM BF16 989.4 dense vs 1,979 sparse / 2)."""
    table = GPUS[name].flops
    assert set(table) == set(DTYPES)
    for dtype, published in zip(DTYPES, DATASHEET[name]):
        assert table[dtype] == pytest.approx(published * T, abs=0.5 * T), (name, dtype)
        assert GPUS[name].peak_flops(dtype) == table[dtype]


@pytest.mark.parametrize("name", list(LIGHTNING_DENSE))
def test_dense_peaks_equal_lightnings_table_where_it_is_dense(name):
    """(Not float64: Lightning lists the non-tensor FP64 rate, half of the FP64 Tensor Core one DGEMM uses.)"""
    theirs = _CUDA_FLOPS[LIGHTNING_DENSE[name]]
    assert {d: GPUS[name].flops[d] for d in LIGHTNING_DTYPE} == {d: theirs[LIGHTNING_DTYPE[d]] for d in LIGHTNING_DTYPE}


@pytest.mark.skipif("h200 sxm1" not in _CUDA_FLOPS, reason="this Lightning's FLOPs table has no H200 (added after 2.2)")
def test_h200_is_dense_where_lightnings_entry_is_the_sparse_figure():
    """Lightning's ``h200 sxm1`` bf16 entry (2e15) is the with-sparsity number; ours is half of the datasheet's."""
    assert _CUDA_FLOPS["h200 sxm1"][torch.bfloat16] == 2e15
    assert gpu("h200").peak_flops("bfloat16") == pytest.approx(2e15 / 2, rel=0.02)


@pytest.mark.parametrize("name", list(NVIDIA_SMI_MIB))
def test_memory_is_what_nvidia_smi_reports(name):
    assert GPUS[name].memory_bytes == NVIDIA_SMI_MIB[name] * MIB == NVIDIA_SMI_MIB[name] * 2**20


@pytest.mark.parametrize("name", list(GPUS))
def test_every_entry_names_its_source_and_dense_or_halved(name):
    source = GPUS[name].source
    assert "datasheet" in source and ("dense" in source or "halved" in source)


@pytest.mark.parametrize("typed, key", [
    ("h100", "h100-sxm"), ("H100", "h100-sxm"), ("H100 SXM", "h100-sxm"), ("h100_pcie", "h100-pcie"),
    ("A100-80GB", "a100-80gb"), ("a100 40gb", "a100-40gb"), ("H200", "h200"), ("L4", "l4"),
])
def test_names_are_looked_up_loosely(typed, key):
    assert gpu(typed) is GPUS[key]


def test_gpu_table_is_dense_and_rejects_unknown():
    assert gpu("h200").peak_flops("bfloat16") < 1.0e15  # 2e15 would be the sparse figure
    with pytest.raises(ValueError, match="`gpu`"):
        gpu("tpu-v5")


def test_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError) as err:
        gpu("v100")
    assert "'v100'" in str(err.value) and all(name in str(err.value) for name in GPUS)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_float64_has_its_own_figure(name):
    """64-true used to take the float32 figure: right by coincidence where FP64 tensor cores match FP32, and
    64x too fast on the L4 (Ada runs FP64 at 1/64 of FP32)."""
    g = gpu(name)
    assert "float64" in g.flops
    assert g.peak_flops("float64") <= g.peak_flops("float32")


def test_l4_float64_is_not_the_float32_rate():
    assert gpu("l4").peak_flops("float64") == pytest.approx(30.3e12 / 64)
