"""FileImage: the reused, page-aligned host buffer IS the snapshot file: ``[8-byte length | header | data]`` for
the step being prepared, the same file safetensors would write for those tensors and that metadata."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from budget_callback.snapshots.format import (PAGE, WIDEST_STEP, SnapshotLayout, encode_header, image_bytes)
from budget_callback.snapshots.image import FileImage

pytestmark = pytest.mark.usefixtures("io_platform")  # linux, macos, windows: see conftest.py


def _page_at_step_1(D: int, dtype: str) -> SnapshotLayout:
    """A layout whose step-1 file is a whole number of pages: only slack for wider steps keeps them in the buffer."""
    return next(layout for layout in (SnapshotLayout(v, D, dtype) for v in range(1, 100_000))
                if layout.file_bytes(1, 1, 1) % PAGE == 0)


LAYOUTS = {
    "bf16 step-1 file of whole pages": _page_at_step_1(1, "bfloat16"),
    "bf16": SnapshotLayout(10, 8, "bfloat16"),
    "f32 W and E": SnapshotLayout(300, 12, "float32", include_embedding=True),
    "f16 tied (E is W)": SnapshotLayout(50, 6, "float16", include_embedding=True, tied=True),
    "stacked x4 with E": SnapshotLayout(40, 4, "bfloat16", snapshots_per_file=4, include_embedding=True),
    "f32 over 2 MiB": SnapshotLayout(1100, 512, "float32"),
}
STEPS = [(1, 1), (123, 7), (99_999, 3), (WIDEST_STEP, WIDEST_STEP)]


def _single(layout: SnapshotLayout) -> SnapshotLayout:
    """The file one FileImage holds: one snapshot, (V, D) per name, whatever snapshots_per_file says."""
    return SnapshotLayout(layout.vocab_size, layout.hidden_dim, layout.dtype, 1, layout.include_embedding, layout.tied)


def _fill(views: dict, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for view in views.values():
        view.copy_(torch.randn(view.shape, generator=g))


def _split(raw: bytes) -> tuple[bytes, dict, bytes]:
    """(8-byte length + header bytes, parsed header, data) of a safetensors file's bytes."""
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[: 8 + n], json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _file(image: FileImage, layout: SnapshotLayout, step: int, every: int) -> bytes:
    return bytes(image.buffer[: _single(layout).file_bytes(step, 1, every)].numpy())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_buffer_is_page_aligned_and_sized_for_any_step(name):
    layout = LAYOUTS[name]
    image = FileImage(layout)
    assert image.buffer.dtype == torch.uint8 and image.buffer.is_contiguous()
    assert image.buffer.data_ptr() % PAGE == 0
    assert image.nbytes == image.buffer.numel() == image_bytes(layout) and image.nbytes % PAGE == 0


@pytest.mark.parametrize("step, every", STEPS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_image_is_the_file_safetensors_would_write(tmp_path, name, step, every):
    """Same length prefix, same header (as JSON: safetensors writes the metadata keys in hash order, which the
    format says does not change the length), same data bytes; and safetensors loads the image as a file."""
    layout = LAYOUTS[name]
    image = FileImage(layout)
    views = image.prepare(step, every)
    _fill(views, seed=step % 1000)
    metadata = _single(layout).metadata(step, 1, every)
    theirs = save({n: v.clone() for n, v in views.items()}, metadata=metadata)
    ours = _file(image, layout, step, every)
    assert len(ours) == len(theirs) == _single(layout).file_bytes(step, 1, every)
    (our_head, our_json, our_data), (their_head, their_json, their_data) = _split(ours), _split(theirs)
    assert our_head[:8] == their_head[:8] and our_json == their_json and our_data == their_data
    assert our_head == image.header == encode_header(_single(layout).tensors(1), metadata)  # format.py's layout

    path = tmp_path / "image.safetensors"
    path.write_bytes(ours)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(layout.names) == list(views)  # views come in file (name) order
        for n, view in views.items():
            assert torch.equal(f.get_tensor(n), view)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_widest_step_fits(name):
    layout = LAYOUTS[name]
    image = FileImage(layout)
    narrow = len(encode_header(_single(layout).tensors(1), _single(layout).metadata(1, 1, 1)))
    views = image.prepare(WIDEST_STEP, WIDEST_STEP)
    assert len(image.header) > narrow  # the wide step really needs a longer header
    assert len(image.header) + layout.step_bytes <= image.nbytes
    assert all(v.shape == (layout.vocab_size, layout.hidden_dim) for v in views.values())
    last = list(views.values())[-1]
    end = last.data_ptr() + last.numel() * last.element_size()
    assert end == image.buffer.data_ptr() + len(image.header) + layout.step_bytes
    _fill(views, seed=0)  # every view is writable memory of the buffer


@pytest.mark.parametrize("name", ["f32 W and E", "stacked x4 with E"])
def test_prepare_rewrites_the_header_for_each_step_in_the_same_buffer(name):
    """Steps of growing and shrinking width: the header is each step's own, the buffer never moves, the views
    follow the header directly (the data region moves with the header's length) and alias the buffer."""
    layout = LAYOUTS[name]
    image = FileImage(layout)
    start = image.buffer.data_ptr()
    lengths = set()
    for step, every in [(1, 1), (10**12, 5), (7, 7), (WIDEST_STEP, 1), (3, 2)]:
        views = image.prepare(step, every)
        expected = encode_header(_single(layout).tensors(1), _single(layout).metadata(step, 1, every))
        assert image.header == expected and bytes(image.buffer[: len(expected)].numpy()) == expected
        assert image.buffer.data_ptr() == start
        lengths.add(len(expected))
        offset = start + len(expected)
        for i, view in enumerate(views.values()):
            assert view.data_ptr() == offset + i * layout.matrix_bytes
            assert view.untyped_storage().data_ptr() == image.buffer.untyped_storage().data_ptr()
            assert view.dtype == getattr(torch, layout.dtype) and view.is_contiguous()
        first = next(iter(views.values()))
        first.fill_(step % 97 + 1)
        data = image.buffer[len(expected): len(expected) + layout.matrix_bytes].view(first.dtype)
        assert torch.equal(data, torch.full_like(data, step % 97 + 1))
    assert len(lengths) > 1  # the data region really moved


def test_the_data_follows_a_page_aligned_file_start_at_an_8_byte_boundary():
    """The file image starts on a page (O_DIRECT from the buffer); the header is padded to 8 bytes, so every
    typed view starts 8-byte aligned whatever the step."""
    for layout in LAYOUTS.values():
        image = FileImage(layout)
        for step, every in STEPS:
            views = image.prepare(step, every)
            assert image.buffer.data_ptr() % PAGE == 0
            assert len(image.header) % 8 == 0
            assert all(v.data_ptr() % 8 == 0 for v in views.values())


def test_a_stacked_layout_images_one_snapshot():
    """A file of K snapshots is assembled elsewhere; the image holds one snapshot: (V, D), count 1."""
    layout = LAYOUTS["stacked x4 with E"]
    image = FileImage(layout)
    image.prepare(40, 10)
    header = json.loads(image.header[8:])
    assert header["__metadata__"]["count"] == "1" and header["__metadata__"]["first_step"] == "40"
    assert header["unembedding"]["shape"] == header["embedding"]["shape"] == [40, 4]
