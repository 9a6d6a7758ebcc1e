"""The capture: reused file images, the right bytes, nothing allocated per snapshot, W read before it changes."""

import torch
from safetensors.torch import load

from budget_callback.forecast.shapes import ModelShape
from budget_callback.lightning.capture import Capture
from budget_callback.lightning.locate import find_embedding, find_unembedding
from budget_callback.models.gpt import GPT
from budget_callback.snapshots.format import SnapshotLayout, image_bytes, ring_size


def _capture(model, dtype="bfloat16", queue_depth=2, when_behind="wait", embedding=False, **kwargs):
    sources = {"unembedding": find_unembedding(model)}
    if embedding:
        sources["embedding"] = find_embedding(model)
    layout = SnapshotLayout(30, 4, dtype, 1, include_embedding=embedding, tied=False)
    return Capture(sources, layout, ring_size(queue_depth), writes=True, when_behind=when_behind, **kwargs), layout


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
    capture = Capture({"unembedding": find_unembedding(model)}, layout, ring_size(1), writes=False)
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
        if len(held) > 2:  # the writer lets go of the oldest: the ring holds three while it knows no pace
            held[-3][1]()
    capture.close()
    assert all(torch.equal(got, want) for (got, _), want in zip(held, expected))
    assert capture.stats.ring_buffers == 3 and capture.stats.ring_sized_by == "not measured yet"


class _Clock:
    """The capture's clock, moved by the test: every time the ring is sized from is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _paced(model, queue_depth: int, write_seconds: float, clock: _Clock, steps: int = 4):
    """A capture (``when_behind="drop"``: a full ring answers at once) and its writer, after ``steps``
    snapshots one second apart, each written in ``write_seconds`` before the next (a slower write holds on)."""
    capture, _ = _capture(model, "float32", queue_depth=queue_depth, when_behind="drop", clock=clock)
    held = []

    def ready(image, event, release):
        held.append(release)

    for step in range(1, steps + 1):
        assert capture.take(ready, step, 1)
        capture.wait()
        clock.now += write_seconds
        held.pop(0)()  # written
        clock.now += max(0.0, 1.0 - write_seconds)
    return capture, held, ready


def test_the_ring_grows_as_far_as_the_slowest_write_spans_snapshots():
    """Snapshots every second, files written in 0.2 s: the ring needs one buffer, and may hold three (one
    filled, one written, one for a write up to a snapshot interval). A write that takes 2.5 s: while it runs,
    the ring grows to those three and the next snapshot is dropped; once it is measured, 2 + ceil(2.5 / 1) = 5
    may be held, and the sixth is dropped, the cap (queue_depth 6 + 2 = 8) notwithstanding."""
    clock = _Clock()
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    capture, held, ready = _paced(model, 6, 0.2, clock)
    assert capture.stats.ring_buffers == 1  # decided once, at the first snapshot
    assert (capture.stats.ring_allowed, capture.stats.ring_sized_by) == (3, "not measured yet")
    taken = []
    for step in range(5, 9):  # the write of step 5 hangs: 5, 6, 7 fill the ring, 8 finds no room
        taken.append(capture.take(ready, step, 1))
        capture.wait()
        clock.now += 1.0
    assert taken == [True, True, True, False] and capture.stats.ring_buffers == 3
    assert capture.stats.ring_sized_by == "the slowest recent write (0.2 s) spans 1 snapshot interval(s) of 1 s"
    clock.now -= 1.5  # step 5's file took 2.5 s; 6 and 7 follow at 0.2 s each
    for _ in range(3):
        held.pop(0)()
        clock.now += 0.2
    clock.now += 0.9
    taken = []
    for step in range(9, 15):  # the writer holds everything again: 5 fit, the 6th is dropped
        taken.append(capture.take(ready, step, 1))
        capture.wait()
        clock.now += 1.0
    assert taken == [True] * 5 + [False] and capture.stats.ring_buffers == 5
    assert capture.stats.ring_sized_by == "the slowest recent write (2.5 s) spans 3 snapshot interval(s) of 1 s"
    assert capture.host_bytes == 5 * image_bytes(capture.layout) and capture.stats.dropped == 2
    for release in held:
        release()
    capture.close()


def _fill(capture, held, ready, steps):
    """Snapshots at ``steps`` while the writer holds on to every buffer: which were taken, the buffers the ring
    made, and why; then the writer lets go."""
    taken = [capture.take(ready, step, 1) for step in steps]
    stats = capture.stats
    for release in held:
        release()
    capture.close()
    return taken, stats.ring_buffers, stats.ring_sized_by


def test_a_disk_slower_than_the_steps_gets_the_fewest_buffers_and_the_cap_binds():
    """Files written in 1.5 s, each before the next snapshot (the steps take 1 s, then wait for the disk): no
    number of buffers catches up, three are held whatever the cap. A fast disk with a slow write, under a cap of
    three: three."""
    clock = _Clock()
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    assert _fill(*_paced(model, 6, 1.5, clock), range(5, 10)) == (
        [True] * 3 + [False] * 2, 3,
        "disk-bound: a file takes 1.5 s to write, snapshots come every 1.5 s; more buffers would only postpone the "
        "wait")
    capture, held, ready = _paced(model, 1, 0.2, clock, steps=6)
    capture.take(ready, 7, 1)
    capture.wait()
    clock.now += 4.0
    held.pop(0)()  # step 7's file took 4 s: 2 + 4 buffers would absorb it, the cap is 1 + 2
    assert _fill(capture, held, ready, range(8, 13)) == (
        [True] * 3 + [False] * 2, 3,
        "the slowest recent write (4 s) spans 4 snapshot intervals of 1 s; the ring is capped at 3 buffers")
