import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from budget_callback.snapshots.format import (SnapshotLayout, encode_header, is_temporary, safetensors_file_bytes,
                                             snapshot_name, step_of_name)
from budget_callback.snapshots.schedule import series_bytes


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
    total = series_bytes(layout, 10_000, 1)
    assert round(total / 2**30, 2) == 11.92
    assert total == sum(layout.file_bytes(s, 1, 1) for s in range(1, 10_001))


@pytest.mark.parametrize("steps, every, K", [(100, 1, 1), (1000, 7, 1), (99, 3, 4), (12345, 10, 16), (5, 10, 1)])
def test_series_bytes_equals_sum_over_files(steps, every, K):
    layout = SnapshotLayout(7, 5, "float32", K)
    firsts = list(range(every, steps + 1, every))
    files = [firsts[i : i + K] for i in range(0, len(firsts), K)]
    assert series_bytes(layout, steps, every) == sum(layout.file_bytes(f[0], len(f), every) for f in files)


def test_safetensors_bytes_generic():
    assert safetensors_file_bytes({"w": ("F16", (3,))}) == 8 + 56 + 6


def test_irregular_steps_are_listed_and_sized_exactly(tmp_path):
    """Several optimizer steps per batch: a stacked file's steps are not first + i * every; the list is stored."""
    layout = SnapshotLayout(20, 4, "bfloat16", 3)
    steps = [4, 6, 10]
    meta = layout.metadata(4, 3, 3, steps)
    assert meta["steps"] == "4,6,10"
    assert "steps" not in layout.metadata(3, 3, 3, [3, 6, 9])
    path = tmp_path / "f.safetensors"
    save_file({"unembedding": torch.zeros(3, 20, 4, dtype=torch.bfloat16)}, str(path), metadata=meta)
    assert layout.file_bytes_for(steps, 3) == os.path.getsize(path)


@pytest.mark.parametrize("names, K, count", [(("unembedding",), 1, 1), (("embedding", "unembedding"), 1, 1),
                                             (("unembedding", "embedding"), 4, 3)])
def test_encode_header_is_what_safetensors_reads(tmp_path, names, K, count):
    """Our own header bytes + raw data make a file that safetensors loads, the same size as save_file's."""
    layout = SnapshotLayout(7, 3, "float16", K, include_embedding=len(names) == 2)
    shapes = layout.tensors(count)
    tensors = {n: torch.randn(*shapes[n][1]).to(torch.float16) for n in shapes}
    meta = layout.metadata(12, count, 2)
    head = encode_header(shapes, meta)
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(head + b"".join(tensors[n].numpy().tobytes() for n in sorted(tensors)))
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata=meta)
    from safetensors.torch import load_file

    loaded = load_file(str(ours))
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    assert os.path.getsize(ours) == os.path.getsize(theirs) == layout.file_bytes(12, count, 2)


@pytest.mark.parametrize("name, temporary", [(".step_000000001.safetensors.tmp-123", True), (".tmpAb12Cd", True),
                                             (".manifest.json.tmp-9", True), (".budget-callback.lock", False),
                                             ("step_000000001.safetensors", False), (".tmpfile_long", False)])
def test_temporaries_ours_and_safetensors(name, temporary):
    assert is_temporary(name) is temporary


def test_names_round_trip():
    assert step_of_name(snapshot_name(123)) == 123
    assert step_of_name(snapshot_name(10**12)) == 10**12
    assert step_of_name("notes.safetensors") is None and step_of_name("step_12.safetensors") is None
