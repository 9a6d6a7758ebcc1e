import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from budget_callback.snapshots.format import (RING_MIN_BUFFERS, SnapshotLayout, encode_header, image_bytes,
                                             is_temporary, ring_buffers, ring_cap, safetensors_file_bytes,
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


# --- the snapshot ring's size -------------------------------------------------------------------------------------
LLAMA_HEAD = SnapshotLayout(128_256, 2_048, "bfloat16")  # 525 MB a snapshot


def test_the_ring_cap_is_queue_depth_within_a_share_of_the_host_ram():
    image = image_bytes(LLAMA_HEAD)
    unknown = ring_cap(LLAMA_HEAD, 4, None)  # the CLI's plan: the training host's RAM is not known
    assert (unknown.buffers, unknown.total_bytes) == (6, 6 * image)
    assert unknown.basis == ("6 file images: queue_depth 4 + 2; when training starts, also at most 25% of the host "
                             "RAM available")
    roomy = ring_cap(LLAMA_HEAD, 4, 64 << 30)
    assert (roomy.buffers, roomy.available_bytes) == (6, 64 << 30)
    assert roomy.basis == "6 file images: queue_depth 4 + 2, within 25% of the 64.00 GiB of host RAM available"
    tight = ring_cap(LLAMA_HEAD, 4, 8 << 30)  # 2 GiB share: 4 images of 501 MiB
    assert (tight.buffers, tight.total_bytes) == (4, 4 * image) and (2 << 30) // image == 4
    assert tight.basis == ("4 file images: as many as fit in 25% of the 8.00 GiB of host RAM available "
                           "(queue_depth 4 + 2 would take 2.94 GiB)")
    small = ring_cap(LLAMA_HEAD, 4, 1 << 30)
    assert small.buffers == RING_MIN_BUFFERS == 3 and small.total_bytes == 3 * image > small.available_bytes // 4
    assert small.basis.startswith("3 file images, the fewest that overlap the copy with the write: more than 25%")


def test_a_stacked_files_slots_come_first_in_the_share():
    stacked = SnapshotLayout(128_256, 2_048, "bfloat16", snapshots_per_file=2)
    slots, image = 2 * stacked.step_bytes, image_bytes(stacked)
    ring = ring_cap(stacked, 4, 12 << 30)  # 3 GiB share: 1 GiB of slots, then the images
    assert ring.buffers == ((3 << 30) - slots) // image == 4 and ring.total_bytes == 4 * image + slots
    assert ring.basis.startswith("4 file images + the stacked file's 2 slots: as many as fit in 25% of the 12.00 GiB")


@pytest.mark.parametrize("writes, intervals, cap, expected", [
    ([0.2, 0.2], [1.0, 1.0, 1.0], 8, (3, "not measured yet")),
    ([0.2, 0.2, 0.2], [1.0, 1.0], 8, (3, "not measured yet")),
    ([0.2, 0.2, 0.2], [1.0, 1.0, 1.0], 8, (3, "the slowest recent write (0.2 s) spans 1 snapshot interval(s) of 1 s")),
    ([0.2, 0.2, 2.5], [1.0, 1.0, 1.0], 8, (5, "the slowest recent write (2.5 s) spans 3 snapshot interval(s) of 1 s")),
    ([0.2, 0.2, 2.5], [1.0, 9.0, 1.0], 4, (4, "the slowest recent write (2.5 s) spans 3 snapshot intervals of 1 s; "
                                            "the ring is capped at 4 buffers")),
    ([1.5, 1.5, 1.5], [1.0, 1.0, 1.0], 8, (3, "disk-bound: a file takes 1.5 s to write, snapshots come every 1 s; "
                                            "more buffers would only postpone the wait")),
    ([0.1, 0.1, 0.1], [0.0, 0.0, 0.0], 8, (3, "disk-bound: a file takes 0.1 s to write, snapshots come every 0 s; "
                                            "more buffers would only postpone the wait")),
])
def test_the_ring_grows_as_the_measured_pace_asks(writes, intervals, cap, expected):
    """The writer's time per file against the training's own time between snapshots (their median)."""
    assert ring_buffers(writes, intervals, cap) == expected
