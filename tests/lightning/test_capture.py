"""The capture: reused host buffers, the right bytes, nothing allocated per snapshot."""

import torch

from budget_callback.lightning.capture import Capture, ring_size
from budget_callback.lightning.locate import find_embedding, find_unembedding
from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape


def test_ring_reuses_buffers_and_copies_exactly():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=False))
    sources = {"unembedding": find_unembedding(model), "embedding": find_embedding(model)}
    capture = Capture(sources, torch.bfloat16, queue_depth=2, writes=True)
    seen = []
    for i in range(2 * ring_size(2)):
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        tensors, event = capture.take()
        assert event is None and tensors["unembedding"].dtype == torch.bfloat16
        assert torch.equal(tensors["unembedding"], model.lm_head.weight.to(torch.bfloat16))
        assert torch.equal(tensors["embedding"], model.wte.weight.to(torch.bfloat16))
        seen.append(tensors["unembedding"].data_ptr())
    assert len(set(seen)) == ring_size(2) and seen[: ring_size(2)] == seen[ring_size(2):]
    assert capture.host_bytes == 2 * ring_size(2) * 30 * 4 * 2


def test_ranks_that_do_not_write_take_part_but_keep_nothing():
    model = GPT(ModelShape(30, 4, 1, 1, n_ctx=8))
    capture = Capture({"unembedding": find_unembedding(model)}, torch.float32, queue_depth=1, writes=False)
    assert capture.take() == ({}, None) and capture.host_bytes == 0
