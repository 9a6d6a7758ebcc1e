"""The capture: reused file images, the right bytes, nothing allocated per snapshot, W read before it changes."""

import torch
from safetensors.torch import load

from budget_callback.forecast.shapes import ModelShape
from budget_callback.lightning.capture import Capture
from budget_callback.lightning.locate import find_embedding, find_unembedding
from budget_callback.models.gpt import GPT
from budget_callback.snapshots.format import SnapshotLayout, image_bytes, ring_size


def _capture(model, dtype="bfloat16", queue_depth=2, when_behind="wait", embedding=False):
    sources = {"unembedding": find_unembedding(model)}
    if embedding:
        sources["embedding"] = find_embedding(model)
    layout = SnapshotLayout(30, 4, dtype, 1, include_embedding=embedding, tied=False)
    return Capture(sources, layout, queue_depth=queue_depth, writes=True, when_behind=when_behind), layout


def test_ring_reuses_images_that_are_whole_files():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=False))
    capture, layout = _capture(model, embedding=True)
    seen = []

    def ready(image, event, release):  # a writer that is done at once
        size = len(image.header) + 2 * layout.matrix_bytes
        as_file = load(bytes(image.buffer[:size].numpy()))  # the image IS the file
        assert event is None and size == layout.file_bytes(len(seen) + 1, 1, 1)
        assert torch.equal(as_file["unembedding"], model.lm_head.weight.to(torch.bfloat16))
        assert torch.equal(as_file["embedding"], model.wte.weight.to(torch.bfloat16))
        seen.append(image.buffer.data_ptr())
        release()

    for step in range(1, 2 * ring_size(2) + 1):
        assert capture.take(ready, step, 1)
        capture.wait()
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
    capture.close()
    assert len(seen) == 2 * ring_size(2) and set(seen) == {seen[0]}  # the writer keeps up: one image, reused
    assert capture.host_bytes == image_bytes(layout)


def test_ranks_that_do_not_write_take_part_but_keep_nothing():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    layout = SnapshotLayout(30, 4, "float32")
    capture = Capture({"unembedding": find_unembedding(model)}, layout, queue_depth=1, writes=False)
    assert capture.take(lambda *a: None, 1, 1) is False and capture.host_bytes == 0


def _slow_writer():
    """A writer that holds every buffer until told to let go (the disk is slower than training)."""
    held = []
    return held, lambda image, event, release: held.append((image.tensors["unembedding"].clone(), release))


def test_a_full_ring_drops_and_counts():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    held, ready = _slow_writer()
    drop, _ = _capture(model, "float32", queue_depth=1, when_behind="drop")
    results = [drop.take(ready, s, 1) for s in range(1, 6)]
    drop.wait()
    assert results == [True] * ring_size(1) + [False] * (5 - ring_size(1)) and drop.stats.dropped == 2
    assert drop.host_bytes == ring_size(1) * image_bytes(drop.layout)  # a slow writer: the whole ring, no more
    for _, release in held:
        release()
    assert drop.take(ready, 6, 1) is True  # buffers given back: room again
    drop.close()


def test_the_copy_reads_w_before_the_optimizer_changes_it():
    """Off the training thread, but `wait()` (before the optimizer step) guarantees the snapshot of step s."""
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    held, ready = _slow_writer()
    capture, _ = _capture(model, "float32", queue_depth=8)
    expected = []
    for step in range(1, 7):
        capture.take(ready, step, 1)
        expected.append(model.lm_head.weight.detach().clone())
        capture.wait()  # what on_before_optimizer_step does
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5).add_(1.0)  # the optimizer step
    capture.close()
    assert all(torch.equal(got, want) for (got, _), want in zip(held, expected))
