"""The traced step against a real step, and the analytic forecast against the trace (CPU, real tensors)."""

import warnings

import pytest
import torch

from budget_callback.models.gpt import GPT
from budget_callback.forecast.memory import TrainSetup, peak_memory, peak_memory_from_trace
from budget_callback.forecast.shapes import ModelShape, preset
from budget_callback.lightning.tracing import _LiveStorageTracker, trace_training_step_memory

SHAPES = [
    ModelShape(vocab_size=1000, d_model=64, n_layer=2, n_head=4, n_ctx=64),
    preset("llama-3-8b", n_layer=1, d_model=128, n_head=4, n_kv_head=2, d_mlp=256, vocab_size=2000, n_ctx=64),
]


def _loss(module, batch):
    return module(batch[0], batch[1])[1]


def _real_peak(model, batch, autocast_dtype=None):
    """Peak live tensor bytes of a real step 2 (forward, backward, AdamW step), measured on real tensors."""
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = _LiveStorageTracker()
    tracker.track((list(model.parameters()), list(model.buffers()), batch, list(opt.state.values())))
    tracker.reset_peak()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with tracker:
        with ctx:
            loss = _loss(model, batch)
        loss.backward()
        del loss
        opt.step()
    return tracker.peak_bytes


@pytest.mark.parametrize("shape", SHAPES, ids=["gpt", "llama"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-mixed"])
def test_trace_equals_real_step(shape, autocast):
    torch.manual_seed(0)
    model = GPT(shape)
    x = torch.randint(0, shape.vocab_size, (4, 64))
    batch = (x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_training_step_memory(model, batch, _loss, optimizer_kwargs={"foreach": False},
                                            autocast_dtype=autocast)
    real = _real_peak(model, batch, autocast)
    assert abs(traced["peak_bytes"] - real) / real < 0.01


@pytest.mark.parametrize("shape", SHAPES, ids=["gpt", "llama"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_analytic_forecast_matches_trace(shape, precision):
    with torch.device("meta"):
        model = GPT(shape)
    x = torch.randint(0, shape.vocab_size, (4, 64), device="meta")
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = trace_training_step_memory(model, (x, x), _loss, optimizer_kwargs={"foreach": False},
                                           autocast_dtype=autocast)
    setup = TrainSetup(micro_batch_size=4, seq_len=64, precision=precision, optimizer_impl="for-loop")
    analytic = peak_memory(shape, setup)["peak_bytes"]
    traced = peak_memory_from_trace(trace, setup)["peak_bytes"]
    assert abs(analytic - traced) / traced < 0.03, (analytic, traced)


def test_trace_leaves_the_real_module_alone():
    model = GPT(SHAPES[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 1000, (2, 16))
    trace_training_step_memory(model, (x, x), _loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
