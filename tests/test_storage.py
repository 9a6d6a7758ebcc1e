import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from budget_callback.storage import SnapshotLayout, safetensors_file_bytes, solve_interval


def _write(layout: SnapshotLayout, path, first: int, count: int, every: int) -> int:
    shape = (layout.vocab_size, layout.hidden_dim) if layout.snapshots_per_file == 1 else (count, layout.vocab_size, layout.hidden_dim)
    dtype = getattr(torch, layout.dtype)
    save_file({n: torch.randn(*shape).to(dtype) for n in layout.names}, str(path), metadata=layout.metadata(first, count, every))
    return os.path.getsize(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("V, D", [(1, 1), (10, 3), (128, 64), (10_000, 64), (50_257, 13)])
@pytest.mark.parametrize("first, every", [(1, 1), (9, 3), (123_456, 7)])
def test_snapshot_file_bytes_exact(tmp_path, dtype, V, D, first, every):
    layout = SnapshotLayout(V, D, dtype)
    assert layout.file_bytes(first, 1, every) == _write(layout, tmp_path / "f.safetensors", first, 1, every)


@pytest.mark.parametrize("K, count", [(2, 2), (4, 3), (16, 16), (10, 9)])
@pytest.mark.parametrize("include_embedding, tied", [(False, False), (True, False), (True, True)])
def test_stacked_and_embedding_files_exact(tmp_path, K, count, include_embedding, tied):
    layout = SnapshotLayout(300, 16, "bfloat16", K, include_embedding, tied)
    assert len(layout.names) == (2 if include_embedding and not tied else 1)
    assert layout.file_bytes(50, count, 5) == _write(layout, tmp_path / "f.safetensors", 50, count, 5)


def test_huge_shape_header_without_allocating(tmp_path):
    """256,000 x 16,384: header written by safetensors for a small file, re-sized, must match."""
    layout = SnapshotLayout(256_000, 16_384, "bfloat16")
    small = SnapshotLayout(2, 3, "bfloat16")
    path = tmp_path / "small.safetensors"
    _write(small, path, 1_000_000, 1, 1)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header["unembedding"]["shape"] = [256_000, 16_384]
    header["unembedding"]["data_offsets"] = [0, 256_000 * 16_384 * 2]
    text = json.dumps(header, separators=(",", ":"))
    expected = 8 + -(-len(text) // 8) * 8 + 256_000 * 16_384 * 2
    assert layout.file_bytes(1_000_000, 1, 1) == expected


def test_data_rate_calculator_example():
    """V=10,000, D=64, bf16, every step for 10,000 steps: 1.22 MiB per file, 11.92 GiB in all."""
    layout = SnapshotLayout(10_000, 64, "bfloat16")
    assert round(layout.file_bytes(1, 1, 1) / 2**20, 2) == 1.22
    total = layout.series_bytes(10_000, 1)
    assert round(total / 2**30, 2) == 11.92
    assert total == sum(layout.file_bytes(s, 1, 1) for s in range(1, 10_001))


@pytest.mark.parametrize("steps, every, K", [(100, 1, 1), (1000, 7, 1), (99, 3, 4), (12345, 10, 16), (5, 10, 1)])
def test_series_bytes_equals_sum_over_files(steps, every, K):
    layout = SnapshotLayout(7, 5, "float32", K)
    firsts = list(range(every, steps + 1, every))
    files = [firsts[i : i + K] for i in range(0, len(firsts), K)]
    assert layout.series_bytes(steps, every) == sum(layout.file_bytes(f[0], len(f), every) for f in files)


def test_safetensors_bytes_generic():
    assert safetensors_file_bytes({"w": ("F16", (3,))}) == 8 + 56 + 6


class TestSolver:
    layout = SnapshotLayout(100, 8, "bfloat16")

    def test_fits_exactly_keeps_requested(self):
        budget = self.layout.series_bytes(500, 2)
        assert solve_interval(self.layout, 500, 2, budget) == 2
        assert solve_interval(self.layout, 500, 2, budget - 1) > 2

    def test_smallest_fitting_interval(self):
        budget = self.layout.series_bytes(500, 1) // 3
        every = solve_interval(self.layout, 500, 1, budget)
        assert self.layout.series_bytes(500, every) <= budget
        assert all(self.layout.series_bytes(500, k) > budget for k in range(1, every))

    def test_budget_of_one_snapshot(self):
        one = self.layout.file_bytes(251, 1, 251)
        every = solve_interval(self.layout, 500, 1, one)
        assert every == 251 and 500 // every == 1

    def test_fits_nothing(self):
        assert solve_interval(self.layout, 500, 1, 100) is None
        assert solve_interval(self.layout, 500, 1, 0) is None

    def test_stacked_files(self):
        layout = SnapshotLayout(100, 8, "bfloat16", 8)
        budget = layout.series_bytes(1000, 1) // 5
        every = solve_interval(layout, 1000, 1, budget)
        assert layout.series_bytes(1000, every) <= budget < layout.series_bytes(1000, every - 1)
