"""The capture: reused host buffers, the right bytes, nothing allocated per snapshot."""

import torch

from budget_callback.lightning.capture import Capture
from budget_callback.snapshots.format import ring_size
from budget_callback.lightning.locate import find_embedding, find_unembedding
from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape


def test_ring_reuses_buffers_and_copies_exactly():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=False))
    sources = {"unembedding": find_unembedding(model), "embedding": find_embedding(model)}
    capture = Capture(sources, torch.bfloat16, queue_depth=2, writes=True)
    seen = []

    def ready(tensors, event, release):  # a writer that is done at once
        assert event is None and tensors["unembedding"].dtype == torch.bfloat16
        assert torch.equal(tensors["unembedding"], model.lm_head.weight.to(torch.bfloat16))
        assert torch.equal(tensors["embedding"], model.wte.weight.to(torch.bfloat16))
        seen.append(tensors["unembedding"].data_ptr())
        release()

    for _ in range(2 * ring_size(2)):
        assert capture.take(ready)
        capture.wait()
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
    capture.close()
    assert len(seen) == 2 * ring_size(2) and len(set(seen)) <= ring_size(2)  # reused, never reallocated
    assert capture.host_bytes == 2 * ring_size(2) * 30 * 4 * 2


def test_ranks_that_do_not_write_take_part_but_keep_nothing():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    capture = Capture({"unembedding": find_unembedding(model)}, torch.float32, queue_depth=1, writes=False)
    assert capture.take(lambda *a: None) is False and capture.host_bytes == 0


def _slow_writer():
    """A writer that holds every buffer until told to let go (the disk is slower than training)."""
    held = []
    return held, lambda tensors, event, release: held.append((tensors["unembedding"].clone(), release))


def test_a_full_ring_drops_and_counts_or_waits():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    held, ready = _slow_writer()
    drop = Capture({"unembedding": find_unembedding(model)}, torch.float32, queue_depth=1, writes=True,
                   when_behind="drop")
    results = [drop.take(ready) for _ in range(5)]
    drop.wait()
    assert results == [True] * ring_size(1) + [False] * (5 - ring_size(1)) and drop.stats.dropped == 2
    for _, release in held:
        release()
    assert drop.take(ready) is True  # buffers given back: room again
    drop.close()


def test_the_copy_reads_w_before_the_optimizer_changes_it():
    """Off the training thread, but `wait()` (before the optimizer step) guarantees the snapshot of step s."""
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    held, ready = _slow_writer()
    capture = Capture({"unembedding": find_unembedding(model)}, torch.float32, queue_depth=8, writes=True)
    expected = []
    for _ in range(6):
        capture.take(ready)
        expected.append(model.lm_head.weight.detach().clone())
        capture.wait()  # what on_before_optimizer_step does
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5).add_(1.0)  # the optimizer step
    capture.close()
    assert all(torch.equal(got, want) for (got, _), want in zip(held, expected))
