"""The memory of one module's training step, measured without running it: traced, estimated, or unknown.

Used by the fit start (:mod:`.planning`, with what the Trainer says) and by ``budget-callback plan --model``
(with what the command line says): the same module and the same run give the same figures.

* Traced (:mod:`.tracing`, :mod:`.tracing_compiled`): one step in Lightning's order with fake tensors, at the
  run's micro-batch and at another one (the per-sample slope gives the largest micro-batch that fits and the
  fewest devices). A module with a deep stack of identical blocks (:mod:`.blocks`) is traced cut to one, two
  and three blocks and extrapolated, checked to be on one line (else traced whole): the cost of a trace no
  longer grows with the depth.
* A compiled module is traced compiled (each micro-batch compiles anew: the fit start traces the run's own
  only, and the slope where the memory budget fails); a compiled step that cannot be traced is traced eagerly
  (more memory) and the notes say why.
* A step that cannot be traced at all is estimated from the blocks found in the module; only when there are
  none is its memory ``unknown``: never model states alone said to fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..forecast.engine import Measured
from ..forecast.flops import train_flops_per_step
from ..forecast.memory import (ESTIMATE_MARGIN, ShardedModel, TrainSetup, peak_memory,
                               peak_memory_from_trace, structure_shape, trace_at_blocks, with_activation_margin)
from ..forecast.precision import optimizer_states_per_param
from ..forecast.shapes import ModelShape
from ..snapshots.format import SnapshotLayout
from . import inputs as R
from .blocks import Stack, find_stack
from .step_order import StepOrder
from .torch_internals import compiled_trace_unsupported
from .tracing import TraceNotHermetic, resize_batch, trace_steps
from .tracing_compiled import find_compiled_regions, trace_compiled_steps

__all__ = ["EXTRAPOLATE_FROM", "StepContext", "measure_module"]

EAGER_METHOD = "traced training step (fake tensors, cpu fake device, Lightning's step order)"
COMPILED_METHOD = "traced compiled training step (inductor partition, fake tensors, cpu fake device)"
EXTRAPOLATE_FROM = 4  # a stack of at least this many identical blocks is traced cut to 1, 2, 3 and extrapolated
_PHASE_PEAKS = ("forward_peak_bytes", "backward_peak_bytes", "accumulate_forward_peak_bytes",
                "accumulate_backward_peak_bytes", "optimizer_peak_bytes", "train_flops")


@dataclass
class StepContext:
    """How the step runs: gathered from a Trainer at fit start, or from the command line by ``plan --model``."""

    setup: TrainSetup
    layout: SnapshotLayout
    order: StepOrder = field(default_factory=StepOrder)
    optimizers: list[torch.optim.Optimizer] | None = None  # the run's own (rebuilt on the fakes); None: SGD
    on_accelerator: bool = False
    capture_bytes: int = 0
    watch: dict[str, torch.Tensor] | None = None  # W (and E): does the step write them in place?
    sharded: ShardedModel | None = None  # FSDP2: this device's shards and the units gathered
    loss_fn: Any = None  # loss_fn(module, batch); None: ``module.training_step(batch, 0)``
    extrapolate: bool = True  # cut a deep stack of identical blocks (else always the whole model)
    # a compiled step traced at two more micro-batches for its per-sample slope (the largest micro-batch that
    # fits): two more compiles each; the fit start asks for it only when the memory budget fails
    compiled_slope: bool = True


@dataclass
class _Traced:
    """What the trace gives the forecast (all None: not traced, the analytic forecast)."""

    memory: dict | None = None
    flops: int | None = None  # forward + backward FLOPs per sequence
    method: str = "analytic transformer"
    trace: dict | None = None  # at the run's micro-batch
    per_sample: dict | None = None  # slope per sample of the micro-batch
    anchor: tuple[int, dict] | None = None  # (micro-batch, trace) the slope starts from, when not the run's
    mode: str = "eager"
    notes: list[str] = field(default_factory=list)
    known: bool = True  # False: neither traced nor estimated; ``memory`` holds the model states only
    basis: str = ""  # beside the memory verdict: an estimate, or why it is unknown
    retrace: Any = None  # retrace(b): the step traced at micro-batch b (the largest that fits is decided by traces)


def measure_module(module: nn.Module, batch: Any, ctx: StepContext, declared: ModelShape | None = None
                   ) -> tuple[Measured, list[str]]:
    """The figures the forecast takes from ``module`` (counts; the traced, estimated or unknown memory and
    FLOPs of its step), and the notes to show beside them. A module that declares its shape (``declared``) is
    left to the analytic forecast, unless it is compiled (the analytic model is eager)."""
    n_params, n_tensors = R.module_counts(module)
    regions, unreadable = compiled_regions(module)
    notes: list[str] = []
    why_eager = compiled_trace_unsupported() if regions else None
    if why_eager:  # said in the report: the compiled run is forecast as eager, the higher figure
        notes.append(f"compiled run forecast as eager ({_compiled_note(regions)[len('forecast as compiled '):]}): "
                     f"{why_eager}")
        regions = []
    if unreadable:
        notes.append(f"compiled regions could not be read ({unreadable}): forecast as eager, which is higher")
    traced, found = _Traced(), None
    if declared is None or regions:  # a declared shape's analytic forecast is eager: a compiled one is traced
        traced = _trace(module, batch, ctx, regions, eager=declared is None)
        if declared is None:
            found = R.describe_module(module, ctx.layout)
        if traced.trace is not None and found is not None:
            found["written_in_step"] = traced.trace["written_in_step"]
    measured = Measured(n_params, n_tensors, R.state_dict_entries(module), traced.memory,
                        traced.flops if declared is None else None, traced.method, traced.trace, traced.per_sample,
                        found, traced.anchor, traced.mode, traced.known, traced.basis,
                        ctx.sharded if traced.trace is not None else None, traced.retrace)
    return measured, notes + traced.notes


def compiled_regions(module: nn.Module) -> tuple[list, str | None]:
    """The compiled regions of the module Lightning trains (``trainer.fit(torch.compile(model))`` leaves
    ``torch.compile``d step methods on it, see Lightning's ``from_compiled``), and why they cannot be read (None:
    they could; a module whose regions cannot be read is forecast as eager, the higher figure, and says so)."""
    try:
        return find_compiled_regions(module), None
    except Exception as err:  # noqa: BLE001 - an unreadable wrapper: forecast as eager, and say why
        return [], f"{type(err).__name__}: {str(err)[:160]}"


class _Tracer:
    """Runs the traces of one measurement: the fake cuda device first where CUDA is present, then the cpu one;
    a deep stack of identical blocks cut and extrapolated."""

    def __init__(self, module: nn.Module, ctx: StepContext, notes: list[str]) -> None:
        self.module, self.ctx, self.notes = module, ctx, notes
        setup = ctx.setup
        self.autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
        self.overrides = {"foreach": True} if ctx.on_accelerator and setup.optimizer_impl == "foreach" else None
        first = next((p.device.type for p in module.parameters()), "cpu")
        self.devices = ("cuda", "cpu") if first == "cuda" and torch.cuda.is_available() else ("cpu",)
        self.device = "cpu"
        self.stack: Stack | None = find_stack(module) if ctx.extrapolate else None
        if self.stack is not None and self.stack.depth < EXTRAPOLATE_FROM:
            self.stack = None

    def method(self, text: str) -> str:
        text = text.replace("cpu fake device", f"{self.device} fake device")
        if self.stack is not None:
            text += f", {self.stack.describe()} extrapolated from the stack cut to a few blocks"
        return text

    def __call__(self, batches: list, compiled: bool) -> list[dict]:
        if self.stack is not None:
            try:
                return self._extrapolated(batches, compiled)
            except _NotOnOneLine as err:
                self.notes.append(f"the blocks of {self.stack.describe()} are not on one line ({err}): traced whole")
                self.stack = None
        return self._run(batches, compiled)

    def _extrapolated(self, batches: list, compiled: bool) -> list[dict]:
        """Eager: the stack cut to two and three blocks, each part of each pass on its line (the peak may move
        from one part to another as the stack deepens). Compiled (one graph: its blocks are not seen): each half
        of each pass, cut to one and two blocks, checked against the stack cut to three at the run's own
        micro-batch (the line through one and two must give three's figures, else the whole model is traced)."""
        sizes = (1, 2) if compiled else (2, 3)
        cut = {n: self._run(batches, compiled, (self.stack, n)) for n in sizes}
        if compiled:  # the check at three blocks, for the run's own micro-batch (the others give the slope)
            cut[3] = self._run(batches[:1], compiled, (self.stack, 3))
        out = []
        for i in range(len(batches)):
            traces = [cut[n][i] for n in sizes]
            if not all("segments" in t for t in traces):
                raise _NotOnOneLine("the parts of the passes were not seen")
            if compiled and i == 0:
                guess = trace_at_blocks(traces[0], traces[1], 3, at=(1, 2))
                bent = [k for k in _PHASE_PEAKS if k in guess and guess[k] != cut[3][0][k]]
                if bent:
                    raise _NotOnOneLine(", ".join(f"{k} at 3 blocks: {guess[k]:,} on the line, {cut[3][0][k]:,} "
                                                  "traced" for k in bent[:3]))
            out.append(trace_at_blocks(traces[0], traces[1], self.stack.depth, at=sizes))
        return out

    def _run(self, batches: list, compiled: bool, cut: tuple[Stack, int] | None = None) -> list[dict]:
        tracer = trace_compiled_steps if compiled else trace_steps
        loss_fn = self.ctx.loss_fn or (lambda m, x: m.training_step(x, 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for device in self.devices:
                try:
                    out = tracer(self.module, batches, loss_fn, optimizer_cls=torch.optim.SGD,
                                 optimizer_kwargs={"lr": 0.0}, optimizer=self.ctx.optimizers,
                                 optimizer_overrides=self.overrides, autocast_dtype=self.autocast,
                                 order=self.ctx.order, watch=self.ctx.watch, device=device, cut=cut)
                    self.device = device
                    return out
                except Exception as err:  # noqa: BLE001 - the fake CUDA device first, the CPU one as before
                    if device == "cpu":
                        raise
                    self.notes.append(f"the trace on the fake cuda device failed ({type(err).__name__}: "
                                      f"{str(err)[:120]}): traced on the fake cpu device")
                    self.devices = ("cpu",)
        raise AssertionError("unreachable")  # pragma: no cover


class _NotOnOneLine(Exception):
    """Traces cut to one, two and three blocks do not grow by the same bytes per block."""


def _trace(module: nn.Module, batch: Any, ctx: StepContext, regions: list | None = None,
           eager: bool = True) -> _Traced:
    """Trace one training step with fake tensors in Lightning's step order (:class:`.step_order.StepOrder`), at
    the run's micro-batch and at another one: the difference is the per-sample slope.

    A compiled module (``regions``) is traced compiled (:mod:`.tracing_compiled`). Its peak is affine in the
    micro-batch only from 3 on (the partitioner saves other tensors below), so the slope comes from two traces
    at 3 or more (the run's B and B + 4, or 4 and 8) and the run's own B is traced as it is; without
    ``ctx.compiled_slope`` (the fit start, unless the memory budget fails) only the run's own B. A compiled step
    that cannot be traced is traced eagerly (``eager=False``: left to the analytic forecast, which is eager),
    which forecasts more memory, and the notes say so."""
    setup, capture, sharded = ctx.setup, ctx.capture_bytes, ctx.sharded
    notes: list[str] = []
    trace = _Tracer(module, ctx, notes)
    B = setup.micro_batch_size
    if regions:
        try:
            at = ((B, B + 4) if B >= 3 else (4, 8)) if ctx.compiled_slope else (B,)
            sizes = [B] + [b for b in at if b != B]
            traces = dict(zip(sizes, trace([batch if b == B else resize_batch(batch, B, b) for b in sizes], True)))
            first, per_sample, anchor = traces[B], None, None
            if ctx.compiled_slope:
                per_sample = {k: (v - traces[at[0]][k]) // (at[1] - at[0]) for k, v in traces[at[1]].items()
                              if isinstance(v, int)}
                anchor = None if at[0] == B else (at[0], traces[at[0]])
            return _Traced(peak_memory_from_trace(first, setup, capture, sharded), first["train_flops"] // max(1, B),
                           trace.method(COMPILED_METHOD), first, per_sample, anchor, "compiled",
                           notes + [_compiled_note(regions)], retrace=_retrace(trace, batch, B, True))
        except Exception as err:  # noqa: BLE001 - said in the report; the eager trace is the safe side
            notes.append(f"compiled step could not be traced ({type(err).__name__}: {str(err)[:200]}): "
                         "forecast as eager, which is higher")
    if not eager:
        return _Traced(notes=notes)
    other = 1 if B > 1 else 2
    try:
        first, second = trace([batch, resize_batch(batch, B, other)], False)
        per_sample = {k: (v - second[k]) // (B - other) for k, v in first.items() if isinstance(v, int)}
    except Exception as err:  # noqa: BLE001 - said where the user looks: the verdict, a warning, the report
        try:  # the step may depend on the batch size: the run's own micro-batch alone, with no slope
            first, per_sample = trace([batch], False)[0], None
        except Exception:  # noqa: BLE001
            return _untraced(module, ctx, err, notes)
    if first.get("values_answered"):
        notes.append(f"{first['values_answered']} data-dependent question(s) answered from values known "
                     "without the data (masks built from shapes)")
    if sharded is not None:
        notes.append(f"traced unsharded; per device under FSDP2 ({sharded.units} fully_shard units): this rank's "
                     "shards and the root unit gathered through the step")
    return _Traced(peak_memory_from_trace(first, setup, capture, sharded), first["train_flops"] // max(1, B),
                   trace.method(EAGER_METHOD), first, per_sample, notes=notes, retrace=_retrace(trace, batch, B, False))


def _retrace(trace: _Tracer, batch: Any, B: int, compiled: bool):
    """The step traced again at micro-batch b (each b once)."""
    done: dict[int, dict] = {}

    def at(b: int) -> dict:
        if b not in done:
            done[b] = trace([resize_batch(batch, B, b)], compiled)[0]
        return done[b]
    return at


def _untraced(module: nn.Module, ctx: StepContext, err: Exception, notes: list[str]) -> _Traced:
    """The step could not be traced: estimated from the structure found in the module, or unknown."""
    setup, capture = ctx.setup, ctx.capture_bytes
    why = f"{type(err).__name__}: {str(err)[:200]}"
    if isinstance(err, TraceNotHermetic):
        why = f"trace discarded, it reached something real ({str(err)[:200]})"
    found = R.describe_module(module, ctx.layout)
    shape = structure_shape(found, setup.seq_len or 1)
    if shape is not None:
        n_params, _ = R.module_counts(module)
        memory = with_activation_margin(peak_memory(shape, setup, n_params, capture_bytes=capture))
        basis = (f"estimated, not traced ({why}): {shape.n_layer} blocks of width {shape.d_model} found, "
                 f"forecast as a transformer with a gated MLP of {shape.mlp_hidden} and fused attention, "
                 f"activations +{ESTIMATE_MARGIN:.0%}")
        flops = train_flops_per_step(shape, setup.seq(shape), 1)["total"]
        return _Traced(memory, flops, "estimated from the structure found (not traced)", notes=notes + [basis],
                       basis="estimated: the step could not be traced")
    basis = f"the step could not be traced ({why}) and no transformer blocks were found to estimate it from"
    return _Traced(peak_memory_from_trace(_model_state_only(module, setup), setup, capture),
                   method=f"not traced ({why}); activations unknown", notes=notes + [basis], known=False,
                   basis=basis)


def _compiled_note(regions: list) -> str:
    """E.g. ``forecast as compiled (inductor): training_step, forward, ...``."""
    backends = ", ".join(dict.fromkeys(r.backend for r in regions))
    where = [r.where.removeprefix("<root>.") for r in regions]
    return f"forecast as compiled ({backends}): " + ", ".join(where[:6]) + (" ..." if len(where) > 6 else "")


def _model_state_only(module: nn.Module, setup: TrainSetup) -> dict:
    """A trace-shaped record with parameters, gradients and optimizer state only (when tracing failed)."""
    p = setup.prec.param_bytes
    trainable = sum(t.numel() for t in module.parameters() if t.requires_grad)
    frozen = sum(t.numel() for t in module.parameters() if not t.requires_grad)
    params, grads = p * (trainable + frozen), p * trainable
    state = optimizer_states_per_param(setup.optimizer, setup.momentum) * p * trainable
    persistent = params + state
    return {"params_bytes": params, "buffers_bytes": 0, "gradients_bytes": grads, "optimizer_state_bytes": state,
            "forward_peak_bytes": persistent, "backward_peak_bytes": persistent,
            "optimizer_peak_bytes": persistent + grads}
