"""A deep stack of identical blocks is traced cut to one, two and three blocks and extrapolated: the same
figures as the whole model's trace, at a fraction of its cost; a stack that is not identical is not cut."""

import warnings

import pytest
import torch
from torch import nn

from budget_callback.forecast.memory import TrainSetup, trace_at_blocks
from budget_callback.forecast.shapes import ModelShape
from budget_callback.lightning.blocks import find_stack
from budget_callback.lightning.measure import StepContext, measure_module
from budget_callback.lightning.torch_internals import compiled_trace_unsupported
from budget_callback.lightning.tracing import trace_steps
from budget_callback.lightning.tracing_compiled import trace_compiled_steps
from budget_callback.models.gpt import GPT
from budget_callback.snapshots.format import SnapshotLayout
from helpers import LossOnly

SHAPE = ModelShape(vocab_size=1000, d_model=64, n_layer=6, n_head=4, n_ctx=64)
FIGURES = ("params_bytes", "gradients_bytes", "optimizer_state_bytes", "forward_peak_bytes", "backward_peak_bytes",
           "optimizer_peak_bytes", "peak_bytes", "activations_bytes", "train_flops")


def _loss(module, batch):
    return module(batch[0], batch[1])[1]


def _traces(model, tracer, stack, sizes, autocast=None, batch=2, **kwargs):
    x = torch.randint(0, SHAPE.vocab_size, (batch, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = lambda cut: tracer(model, [(x, x)], kwargs.get("loss", _loss), optimizer_kwargs={"foreach": False},
                                 autocast_dtype=autocast, cut=cut)[0]
        return [run((stack, n)) for n in sizes] + [run(None)]


@pytest.mark.parametrize("autocast,batch", [(None, 2), (torch.bfloat16, 2), (None, 1)],
                         ids=["fp32", "bf16-autocast", "fp32-B1"])
def test_each_part_of_a_pass_on_its_line_is_the_whole_model(autocast, batch):
    """Cut to two and three blocks, each part of each pass (before the stack, its bottom and top blocks, after
    it) extrapolated: the whole model's figures, including a backward whose peak moves from its start (shallow)
    to its end (deep, the gradients outgrow the activations freed)."""
    model = GPT(SHAPE)
    stack = find_stack(model)
    assert stack.path == "blocks" and stack.depth == 6
    two, three, whole = _traces(model, trace_steps, stack, (2, 3), autocast, batch)
    guess = trace_at_blocks(two, three, 6, at=(2, 3))
    assert {k: guess[k] for k in FIGURES} == {k: whole[k] for k in FIGURES}
    assert guess["peak_phase"] == whole["peak_phase"] and len(list(model.blocks)) == 6  # the cut was put back


@pytest.mark.skipif(compiled_trace_unsupported() is not None, reason=f"{compiled_trace_unsupported()}")
def test_compiled_the_line_through_one_and_two_blocks_is_the_whole_model():
    """Inductor partitions identical blocks identically: the compiled graph of six blocks saves six times what
    one saves, plus what is outside the blocks; each half of each pass is on a line in the depth (the backward's
    peak moves from its start to its end as the stack deepens)."""
    model = GPT(SHAPE)
    compiled = torch.compile(LossOnly(model))
    stack = find_stack(compiled)
    two, three, whole = _traces(compiled, trace_compiled_steps, stack, (2, 3), torch.bfloat16,
                                loss=lambda m, b: m(b[0], b[1]))
    guess = trace_at_blocks(two, three, 6, at=(2, 3))
    assert {k: guess[k] for k in FIGURES} == {k: whole[k] for k in FIGURES}


def test_the_fit_start_measurement_extrapolates_and_equals_the_whole_trace():
    model = GPT(SHAPE)
    x = torch.randint(0, SHAPE.vocab_size, (2, 64))
    ctx = StepContext(TrainSetup(2, 64, optimizer_impl="for-loop"), SnapshotLayout(1000, 64, "bfloat16"),
                      loss_fn=_loss)
    cut, notes = measure_module(model, (x, x), ctx)
    whole, _ = measure_module(model, (x, x), StepContext(ctx.setup, ctx.layout, loss_fn=_loss, extrapolate=False))
    assert "blocks (6 x Block) extrapolated from the stack cut to a few blocks" in cut.method
    assert cut.memory["peak_bytes"] == whole.memory["peak_bytes"]
    assert cut.trace_per_sample == whole.trace_per_sample
    assert cut.train_flops_per_sequence == whole.train_flops_per_sequence


class Alternating(nn.Module):
    """Every other block attends over a window (Gemma-2 style): the blocks are not identical."""

    def __init__(self, window: bool) -> None:
        super().__init__()
        self.window = window
        self.proj = nn.Linear(8, 8)
        self.layer_idx = 0  # an index of its own is no difference


def test_blocks_that_differ_are_not_a_stack_and_an_index_is_no_difference():
    different = nn.ModuleList(Alternating(window=i % 2 == 1) for i in range(6))
    assert find_stack(nn.Sequential(different)) is None
    same = nn.ModuleList(Alternating(window=False) for _ in range(6))
    for i, block in enumerate(same):
        block.layer_idx = i
    assert find_stack(nn.Sequential(same)).depth == 6
    for block in same:  # a setting that happens to equal one block's index is a setting (HF's kv groups = 2)
        block.groups = 2
    assert find_stack(nn.Sequential(same)).depth == 6
    widths = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
    assert find_stack(nn.Sequential(widths)) is None
