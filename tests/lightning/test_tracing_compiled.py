"""The compiled step: found however a user compiles, traced from inductor's own partition, checked against a real
compiled step measured by the profiler (an independent method), and forecast at fit start."""

import warnings

import pytest
import torch
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn

from budget_callback import BudgetCallback, BudgetExceededError
from budget_callback.forecast.report import render
from budget_callback.forecast.memory import TrainSetup, memory_phases, peak_memory_from_trace
from budget_callback.forecast.shapes import ModelShape
from budget_callback.lightning.tracing import trace_training_step_memory
from budget_callback.lightning.tracing_compiled import (CompiledTraceError, find_compiled_regions,
                                                        trace_compiled_training_step_memory)
from budget_callback.models.gpt import GPT
from budget_callback.lightning.torch_internals import compiled_trace_unsupported
from helpers import LossOnly, LlamaLM, token_loader, trainer
from step_probe import real_step_peak

UNSUPPORTED = compiled_trace_unsupported()
needs_compiled_tracer = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"{UNSUPPORTED}")


def _quiet(model):
    model.log = lambda *args, **kwargs: None  # no Trainer outside fit
    return model


def _step(model, batch):
    return model.training_step(batch, 0)


def _batch(vocab=256, b=4, t=64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_finds_every_way_users_compile():
    plain = LlamaLM()
    assert find_compiled_regions(plain) == []

    lightning_way = from_compiled(torch.compile(LlamaLM()))  # what trainer.fit(torch.compile(model)) trains
    assert {r.where for r in find_compiled_regions(lightning_way)} >= {"<root>.forward", "<root>.training_step"}

    method = LlamaLM()
    method.compile(mode="max-autotune")
    (region,) = find_compiled_regions(method)
    assert region.where == "<root> (.compile())" and region.backend == "inductor"
    assert "max_autotune" in region.describe()

    children = LlamaLM()
    children.layers = nn.ModuleList(torch.compile(layer, backend="aot_eager") for layer in children.layers)
    assert [(r.where, r.backend) for r in find_compiled_regions(children)] == [
        ("layers.0 (torch.compile)", "aot_eager"), ("layers.1 (torch.compile)", "aot_eager")]


@needs_compiled_tracer
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_compiled_trace_equals_a_real_compiled_step(precision):
    """Llama-style (RMSNorm, GQA, SwiGLU, untied head), AdamW, ``model.compile()``: the forecast of the compiled
    step is a real compiled step of a real fit (the profiler's events, which see inductor's own buffers), in
    Lightning's order, and below what the same step needs eagerly."""
    torch.manual_seed(0)
    model = LlamaLM(vocab=256, d=64, layers=2)
    model.compile()
    loader = token_loader(vocab=256, seq=64, n=16, batch=4)
    opt = model.configure_optimizers()
    autocast = torch.bfloat16 if precision == "bf16-mixed" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = trace_compiled_training_step_memory(model, next(iter(loader)), _step, optimizer=opt,
                                                       autocast_dtype=autocast)
        eager = trace_training_step_memory(model, next(iter(loader)), _step, optimizer=opt, autocast_dtype=autocast)
    real = real_step_peak(model, loader, precision=precision)
    assert compiled["forward_gradients_bytes"] == compiled["gradients_bytes"] > 0
    assert abs(compiled["peak_bytes"] - real) / real < 0.03, (compiled["peak_bytes"], real)
    assert compiled["peak_bytes"] < 0.95 * eager["peak_bytes"]
    assert not any(isinstance(p, torch._subclasses.FakeTensor) for p in model.parameters())


@needs_compiled_tracer
def test_a_backend_it_cannot_trace_is_named():
    model = _quiet(LlamaLM())
    model.compile(backend=lambda gm, example: gm.forward)  # a user's own backend
    with pytest.raises(CompiledTraceError, match="backend"):
        trace_compiled_training_step_memory(model, _batch(vocab=64), _step, optimizer_cls=torch.optim.AdamW)


@needs_compiled_tracer
def test_fit_forecasts_the_compiled_step(tmp_path):
    """trainer.fit on a compiled module: the fit-start forecast is the compiled partition's at the run's own
    micro-batch, with the fewest devices (the largest micro-batch would cost two more compiles: left to `plan`
    unless the budget fails, below); the real compiled run trains and snapshots as usual."""
    torch.manual_seed(0)
    model = LlamaLM(vocab=256, d=64, layers=2)
    model.compile()
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", memory_budget="64MiB", verbose=False)
    trainer(tmp_path, [cb], max_steps=2).fit(model, token_loader(vocab=256, seq=64, batch=4))
    m = cb.forecast.memory
    assert m["mode"] == "compiled" and "compiled" in m["activations_method"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randint(0, 256, (4, 64))
        opt = model.trainer.optimizers[0]
        compiled = trace_compiled_training_step_memory(model, (x, x + 1), _step, optimizer=opt)
        eager = trace_training_step_memory(model, (x, x + 1), _step, optimizer=opt)
    setup = cb.forecast.inputs.setup
    assert m["peak_bytes"] == peak_memory_from_trace(compiled, setup)["peak_bytes"]
    assert m["peak_bytes"] < peak_memory_from_trace(eager, setup)["peak_bytes"]
    assert m["max_batch_size"] is None and m["largest_traced"] is False and m["min_devices"] == 1
    assert "largest micro-batch not traced at fit start" in render(cb.forecast)
    assert any("forecast as compiled (inductor)" in n for n in cb.forecast.notes)
    assert not any(e["event"] == "compiled_graph_breaks" for e in cb.events)  # one graph, as traced
    assert cb.bytes_written == cb.projected_bytes == sum(f.stat().st_size for f in (tmp_path / "s").glob("*.safetensors")) > 0


@needs_compiled_tracer
def test_a_compiled_run_over_its_memory_budget_is_told_the_largest_micro_batch_that_fits(tmp_path):
    """Where the memory budget fails the slope is traced after all: a budget one byte under the run's own
    forecast (micro-batch 4) aborts naming micro-batch 3, before anything is written."""
    def fit(budget, where):
        torch.manual_seed(0)
        model = LlamaLM(vocab=256, d=64, layers=2)
        model.compile()
        cb = BudgetCallback(tmp_path / where, snapshot_dtype="float32", verbose=False, memory_budget=budget)
        trainer(tmp_path / where, [cb], max_steps=1).fit(model, token_loader(vocab=256, seq=64, batch=4))
        return cb

    fits = fit("1GiB", "fits").forecast.memory
    assert fits["largest_traced"] is False
    with pytest.raises(BudgetExceededError, match="largest micro-batch that fits: 3"):
        fit(f"{fits['peak_bytes'] - 1}B", "over")
    assert not list((tmp_path / "over").glob("**/*.safetensors"))


@needs_compiled_tracer
def test_fit_with_an_untraceable_compiled_step_forecasts_eager_and_says_so(tmp_path):
    model = LlamaLM(vocab=64, d=16)
    model.compile(backend=lambda gm, example: gm.forward)
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, token_loader(vocab=64))
    assert cb.forecast.memory["mode"] == "eager"
    assert cb.forecast.memory["phases"]["forward_backward"]["activations"] > 0  # the eager trace's
    assert any("compiled step could not be traced (CompiledTraceError" in n and "forecast as eager" in n
               for n in cb.forecast.notes)


@needs_compiled_tracer
@pytest.mark.parametrize("precision,batch,returns", [("bf16-mixed", 1, "loss"), ("bf16-mixed", 4, "loss"),
                                                     ("bf16-mixed", 4, "logits"), ("32-true", 2, "logits")])
def test_analytic_compiled_forecast_within_3_percent_of_the_compiled_trace(precision, batch, returns):
    """`plan --compile`'s model of the compiled partition against a compiled trace of the reference GPT; a graph
    that returns the logits too (``logits, loss = model(x, y)`` compiled) is ``keep_logits``."""
    shape = ModelShape(vocab_size=2000, d_model=128, n_layer=2, n_head=4, n_ctx=128)
    setup = TrainSetup(batch, precision=precision, optimizer="adamw", optimizer_impl="fused", compile=True,
                       keep_logits=returns == "logits")
    torch.manual_seed(0)
    model = GPT(shape)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randint(0, shape.vocab_size, (batch, shape.n_ctx))
    compiled, step = ((torch.compile(model), lambda m, b: m(b[0], b[1])[1]) if returns == "logits"
                      else (torch.compile(LossOnly(model)), lambda m, b: m(b[0], b[1])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_compiled_training_step_memory(
            compiled, (x, x), step, optimizer=opt, autocast_dtype=torch.bfloat16 if precision == "bf16-mixed" else None)
    analytic = memory_phases(shape, setup)["forward_backward"]["total"]
    assert analytic == pytest.approx(traced["backward_peak_bytes"], rel=0.03)
    eager = memory_phases(shape, TrainSetup(batch, precision=precision, optimizer="adamw", optimizer_impl="fused",
                                            keep_logits=returns == "logits"))["forward_backward"]["total"]
    assert analytic < eager


def test_a_compiled_run_says_how_it_was_forecast_and_why_on_any_torch(tmp_path, monkeypatch):
    """Where the compiled tracer cannot run (torch < 2.11: no ``innermost_backend``; 2.6 also no
    ``GraphLowering._compile_to_module_lines``) the run is forecast as eager, the higher figure, and the report
    says so with the reason. On an older torch this is that torch; on a newer one the reason is simulated."""
    import budget_callback.lightning.measure as measure

    why = UNSUPPORTED or "the compiled tracer needs torch >= 2.11; this is torch 2.6.0 (simulated)"
    monkeypatch.setattr(measure, "compiled_trace_unsupported", lambda: why)
    model = LlamaLM(vocab=64, d=16)
    model.compile()
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, token_loader(vocab=64))
    assert cb.forecast.memory["mode"] == "eager"
    assert cb.forecast.memory["activations_method"].startswith("traced training step")
    note = next(n for n in cb.forecast.notes if n.startswith("compiled run forecast as eager"))
    assert why in note and "(.compile())" in note


@needs_compiled_tracer
def test_a_compile_that_bypasses_the_stub_is_refused(monkeypatch):
    """If inductor stops calling the stubbed code generation, fit start would compile real kernels and nothing
    would notice: the trace checks that every inductor region went through the stub, and refuses otherwise."""
    import budget_callback.lightning.torch_internals as internals

    stub = internals._stub_compile_to_module_lines

    def uncounted(check):  # generates the same code, but as if through another path: not counted
        return stub(internals.StubCheck())
    monkeypatch.setattr(internals, "_stub_compile_to_module_lines", uncounted)
    model = LlamaLM(vocab=64, d=16)
    model.compile()
    with pytest.raises(CompiledTraceError, match="code generation was stubbed for 0 graph"):
        trace_compiled_training_step_memory(model, _batch(vocab=64), _step, optimizer=model.configure_optimizers())


class _Breaking(LlamaLM):
    """A compiled step that dynamo compiles in pieces (a graph break after each block)."""

    def forward(self, x):
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = layer(h)
            torch._dynamo.graph_break()  # as an unsupported call or a print makes one
        return self.output(self.norm(h))


@needs_compiled_tracer
def test_a_graph_break_in_the_compiled_step_is_said_after_the_first_step(tmp_path):
    """The fit-start forecast traces each compiled region as one graph; dynamo broke this one in pieces, which
    the first real step shows: a warning and an event, once."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _Breaking(vocab=64, d=16)
    model.compile()
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=3).fit(model, token_loader(vocab=64))
    said = [str(w.message) for w in caught if "graph break" in str(w.message)]
    assert len(said) == 1 and "the memory forecast may be low" in said[0]
    events = [e for e in cb.events if e["event"] == "compiled_graph_breaks"]
    assert len(events) == 1 and events[0]["count"] >= 1 and events[0]["step"] == 1
