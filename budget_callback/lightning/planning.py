"""The fit-start forecast: gather plain inputs from the Trainer and the module, trace if needed, forecast.

No decision is acted on here; :mod:`.session` applies the forecast's decision.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import lightning.pytorch as pl
import torch

from ..forecast.console import REPORT_CHARS
from ..forecast.engine import Budgets, Forecast, Measured, PlanInputs, SnapshotSpec, forecast
from ..forecast.report import REPORT_TITLE, render
from ..forecast.flops import train_flops_per_step
from ..forecast.memory import (ESTIMATE_MARGIN, ShardedModel, peak_memory, peak_memory_from_trace, structure_shape,
                               with_activation_margin)
from ..forecast.precision import optimizer_states_per_param
from ..forecast.shapes import ModelShape
from ..forecast.wandb_usage import CALLBACK_METRICS, CALLBACK_METRICS_ACCELERATOR
from ..snapshots.format import SnapshotLayout
from . import inputs as R
from .config import BudgetConfig
from .locate import MatrixSource
from .sharding import sharded_model
from .step_order import StepOrder
from .torch_internals import compiled_trace_unsupported, storage_key
from .tracing import TraceNotHermetic, resize_batch, trace_steps
from .tracing_compiled import find_compiled_regions, trace_compiled_steps


@dataclass(frozen=True)
class FitFacts:
    """What the fit looks like, gathered on every rank before anything is decided."""

    layout: SnapshotLayout
    steps_per_batch: int
    final_step: int
    start_step: int
    sharded: bool
    on_accelerator: bool
    capture_device_bytes: int


def capture_device_bytes(sources: dict[str, MatrixSource], layout: SnapshotLayout, sharded: bool) -> int:
    """What one snapshot allocates on the training device: a sharded W gathered whole on every rank
    (any device), and on an accelerator the cast to the snapshot dtype before the copy to the host."""
    total = 0
    for source in sources.values():
        w = source.get()
        per = layout.vocab_size * layout.hidden_dim
        if sharded:
            total += per * w.element_size()
        if w.device.type in ("cuda", "xla", "mps") and str(w.dtype).removeprefix("torch.") != layout.dtype:
            total += per * layout.itemsize
    return total


def plan_fit(trainer: pl.Trainer, module: pl.LightningModule, config: BudgetConfig, facts: FitFacts, batch,
             resume: dict | None, free_disk_bytes: int, sources: dict[str, MatrixSource] | None = None) -> Forecast:
    """The forecast for this fit (rank 0): analytic for a module that declares its shape, else traced. A traced
    step also says whether it writes the matrices of ``sources`` in place (``model["written_in_step"]``)."""
    declared = R.find_shape(module)
    memory_default, on_accelerator = R.memory_budget_default(module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    optimizer, momentum, impl, _ = R.optimizer_settings(trainer, on_accelerator)
    dims = R.batch_dims(batch) or (1, None)
    layout = facts.layout
    shape = declared
    if shape is None:  # stand-in: only V, D and tying are used (storage); memory and FLOPs are traced
        shape = ModelShape(vocab_size=layout.vocab_size, d_model=layout.hidden_dim, n_layer=1, n_head=1,
                           n_ctx=dims[1] or 1, tied=layout.tied, name=type(module).__name__)
    setup = R.train_setup(trainer, dims[0], dims[1] or shape.n_ctx, optimizer, momentum, impl)
    console = R.console_spec(trainer, module, REPORT_CHARS if config.verbose else 0,
                             on_accelerator and device.type == "cuda")
    spec, ckpt_dirs = R.logging_spec(trainer, facts.final_step,
                                     CALLBACK_METRICS_ACCELERATOR if on_accelerator else CALLBACK_METRICS, console)
    shares = any(R.same_file_system(config.snapshot_dir, d) for d in ckpt_dirs) if ckpt_dirs else True
    inputs = PlanInputs(
        shape=shape, setup=setup, steps=facts.final_step,
        snapshot=SnapshotSpec(config.save_every_n_steps, config.snapshot_dtype, config.snapshots_per_file,
                              config.include_embedding, config.queue_depth),
        logging=spec,
        budgets=Budgets(config.disk_budget, config.memory_budget or memory_default or None, config.wandb_budget,
                        config.on_exceed),
        checkpoints_share_disk=shares, gpu=R.gpu_table_name(device), steps_per_batch=facts.steps_per_batch,
        resume=resume, capture_device_bytes=facts.capture_device_bytes, strategy_name=R.strategy_label(trainer),
    )
    n_params, n_tensors = R.module_counts(module)
    regions, unreadable = compiled_regions(module)
    traced, found, notes, sharded = _Traced(), None, [], None
    why_eager = compiled_trace_unsupported() if regions else None
    if why_eager:  # said in the report: the compiled run is forecast as eager, the higher figure
        notes.append(f"compiled run forecast as eager ({_compiled_note(regions)[len('forecast as compiled '):]}): "
                     f"{why_eager}")
        regions = []
    if unreadable:
        notes.append(f"compiled regions could not be read ({unreadable}): forecast as eager, which is higher")
    if declared is None or regions:  # a declared shape's analytic forecast is eager: a compiled one is traced
        sharded = sharded_model(module, setup.world_size)
        traced = _trace(trainer, module, batch, setup, on_accelerator, facts.capture_device_bytes,
                        _own_parameters(module, sources), regions, eager=declared is None, layout=layout,
                        sharded=sharded)
        if declared is None:
            found = R.describe_module(module, layout)
        if traced.trace is not None and found is not None:
            found["written_in_step"] = traced.trace["written_in_step"]
    measured = Measured(n_params, n_tensors, R.state_dict_entries(module), traced.memory,
                        traced.flops if declared is None else None, traced.method, traced.trace, traced.per_sample,
                        found, traced.anchor, traced.mode, traced.known, traced.basis,
                        sharded if traced.trace is not None else None)
    result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    if config.verbose:  # the report W&B will capture is this forecast's own: count its real length
        exact = replace(console, report_chars=len(REPORT_TITLE) + 1 + len(render(result)))
        inputs = replace(inputs, logging=replace(inputs.logging, console=exact))
        result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    result.notes.extend(notes + traced.notes)
    if R.precision_note(trainer):
        result.notes.append(R.precision_note(trainer))
    if resume is not None:
        result.notes.append(f"resumed at step {facts.start_step}: the series continues "
                            f"(save_every_n_steps={result.save_every_n_steps})")
    if facts.steps_per_batch > 1:
        result.notes.append(f"manual optimization with {facts.steps_per_batch} optimizers: expecting "
                            f"{facts.steps_per_batch} optimizer steps per batch (the schedule follows what it sees)")
    return result


def _own_parameters(module: torch.nn.Module, sources: dict[str, MatrixSource] | None) -> dict[str, torch.Tensor]:
    """The module's parameters that hold each source's matrix (same storage), by source name."""
    found: dict[str, torch.Tensor] = {}
    for name, source in (sources or {}).items():
        try:
            storage = storage_key(source.get())
            found.update({name: p for p in module.parameters() if storage_key(p) == storage})
        except (RuntimeError, NotImplementedError, AttributeError):  # a tensor subclass without one storage
            continue
    return found


def compiled_regions(module: torch.nn.Module) -> tuple[list, str | None]:
    """The compiled regions of the module Lightning trains (``trainer.fit(torch.compile(model))`` leaves
    ``torch.compile``d step methods on it, see Lightning's ``from_compiled``), and why they cannot be read (None:
    they could; a module whose regions cannot be read is forecast as eager, the higher figure, and says so)."""
    try:
        return find_compiled_regions(module), None
    except Exception as err:  # noqa: BLE001 - an unreadable wrapper: forecast as eager, and say why
        return [], f"{type(err).__name__}: {str(err)[:160]}"


@dataclass
class _Traced:
    """What the fit-start trace gives the forecast (all None: not traced, the analytic forecast)."""

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


EAGER_METHOD = "traced training step (fake tensors, cpu fake device, Lightning's step order)"
COMPILED_METHOD = "traced compiled training step (inductor partition, fake tensors, cpu fake device)"


def _trace(trainer, module, batch, setup, on_accelerator: bool, capture: int, watch: dict | None = None,
           regions: list | None = None, eager: bool = True, layout: SnapshotLayout | None = None,
           sharded: ShardedModel | None = None) -> _Traced:
    """Trace one training step with fake tensors on the CPU fake device, in Lightning's step order
    (:class:`.step_order.StepOrder`), at the run's micro-batch and at another one: the difference is the
    per-sample slope (largest micro-batch that fits, fewest devices).

    A compiled module (``regions``) is traced compiled (:mod:`.tracing_compiled`). Its peak is affine in the
    micro-batch only from 3 on (the partitioner saves other tensors below), so the slope comes from two traces
    at 3 or more (the run's B and B + 4, or 4 and 8) and the run's own B is traced as it is. A compiled step
    that cannot be traced is traced eagerly (``eager=False``: left to the analytic forecast, which is eager),
    which forecasts more memory, and the notes say so.

    A step that cannot be traced at all is estimated from the structure found in the module (its blocks, widths
    and vocabulary: :func:`..forecast.memory.structure_shape`), and only when there is none is its memory
    ``unknown``: never a forecast of model states alone that says "fits"."""
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
    overrides = {"foreach": True} if on_accelerator and setup.optimizer_impl == "foreach" else None
    order = StepOrder.of_lightning(trainer, module)
    optimizers = list(trainer.optimizers) if order.manual else (trainer.optimizers[:1] or None)

    on_cuda = next((p.device.type for p in module.parameters()), "cpu") == "cuda" and torch.cuda.is_available()
    notes, used = [], {"device": "cpu"}

    def method(text: str) -> str:
        return text.replace("cpu fake device", f"{used['device']} fake device")

    def trace(batches: list, compiled: bool) -> list[dict]:
        tracer = trace_compiled_steps if compiled else trace_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for device in ("cuda", "cpu") if on_cuda else ("cpu",):
                try:
                    out = tracer(module, batches, lambda m, x: m.training_step(x, 0), optimizer_cls=torch.optim.SGD,
                                 optimizer_kwargs={"lr": 0.0}, optimizer=optimizers, optimizer_overrides=overrides,
                                 autocast_dtype=autocast, order=order, watch=watch, device=device)
                    used["device"] = device
                    return out
                except Exception as err:  # noqa: BLE001 - the fake CUDA device first, the CPU one as before
                    if device == "cpu":
                        raise
                    notes.append(f"the trace on the fake cuda device failed ({type(err).__name__}: "
                                 f"{str(err)[:120]}): traced on the fake cpu device")
    B = setup.micro_batch_size
    if regions:
        try:
            at = (B, B + 4) if B >= 3 else (4, 8)
            sizes = [B] + [b for b in at if b != B]
            traces = dict(zip(sizes, trace([batch if b == B else resize_batch(batch, B, b) for b in sizes], True)))
            first = traces[B]
            per_sample = {k: (v - traces[at[0]][k]) // (at[1] - at[0]) for k, v in traces[at[1]].items()
                          if isinstance(v, int)}
            return _Traced(peak_memory_from_trace(first, setup, capture, sharded), first["train_flops"] // max(1, B),
                           method(COMPILED_METHOD), first, per_sample, None if at[0] == B else (at[0], traces[at[0]]),
                           "compiled", [_compiled_note(regions)])
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
            return _untraced(module, setup, capture, layout, err, notes)
    if first.get("values_answered"):
        notes.append(f"{first['values_answered']} data-dependent question(s) answered from values known "
                     "without the data (masks built from shapes)")
    if sharded is not None:
        notes.append(f"traced unsharded; per device under FSDP2 ({sharded.units} fully_shard units): this rank's "
                     "shards and the root unit gathered through the step")
    return _Traced(peak_memory_from_trace(first, setup, capture, sharded), first["train_flops"] // max(1, B),
                   method(EAGER_METHOD), first, per_sample, notes=notes)


def _untraced(module, setup, capture: int, layout: SnapshotLayout | None, err: Exception, notes: list[str]) -> _Traced:
    """The step could not be traced: estimated from the structure found in the module, or unknown."""
    why = f"{type(err).__name__}: {str(err)[:200]}"
    if isinstance(err, TraceNotHermetic):
        why = f"trace discarded, it reached something real ({str(err)[:200]})"
    found = R.describe_module(module, layout) if layout is not None else {}
    shape = structure_shape(found, setup.seq_len or 1) if found else None
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


def _model_state_only(module: torch.nn.Module, setup) -> dict:
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
