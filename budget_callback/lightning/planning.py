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
from ..forecast.memory import peak_memory_from_trace
from ..forecast.precision import optimizer_states_per_param
from ..forecast.shapes import ModelShape
from ..forecast.wandb_usage import CALLBACK_METRICS, CALLBACK_METRICS_ACCELERATOR
from ..snapshots.format import SnapshotLayout
from . import inputs as R
from .config import BudgetConfig
from .locate import MatrixSource
from .tracing import resize_batch, trace_training_step_memory
from .tracing_compiled import find_compiled_regions, trace_compiled_training_step_memory


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
    regions = compiled_regions(module)
    traced, found = _Traced(), None
    if declared is None or regions:  # a declared shape's analytic forecast is eager: a compiled one is traced
        traced = _trace(trainer, module, batch, setup, on_accelerator, facts.capture_device_bytes,
                        _own_parameters(module, sources), regions, eager=declared is None)
        if declared is None:
            found = R.describe_module(module, layout)
        if traced.trace is not None and found is not None:
            found["written_in_step"] = traced.trace["written_in_step"]
    measured = Measured(n_params, n_tensors, R.state_dict_entries(module), traced.memory,
                        traced.flops if declared is None else None, traced.method, traced.trace, traced.per_sample,
                        found, traced.anchor, traced.mode)
    result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    if config.verbose:  # the report W&B will capture is this forecast's own: count its real length
        exact = replace(console, report_chars=len(REPORT_TITLE) + 1 + len(render(result)))
        inputs = replace(inputs, logging=replace(inputs.logging, console=exact))
        result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    result.notes.extend(traced.notes)
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
            storage = source.get().untyped_storage()._cdata
            found.update({name: p for p in module.parameters() if p.untyped_storage()._cdata == storage})
        except (RuntimeError, NotImplementedError, AttributeError):  # a tensor subclass without one storage
            continue
    return found


def compiled_regions(module: torch.nn.Module) -> list:
    """The compiled regions of the module Lightning trains (``trainer.fit(torch.compile(model))`` leaves
    ``torch.compile``d step methods on it, see Lightning's ``from_compiled``); [] when none can be read."""
    try:
        return find_compiled_regions(module)
    except Exception:  # noqa: BLE001 - an unreadable wrapper: forecast as eager (the higher figure)
        return []


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


EAGER_METHOD = "traced training step (fake tensors, cpu fake device)"
COMPILED_METHOD = "traced compiled training step (inductor partition, fake tensors, cpu fake device)"


def _trace(trainer, module, batch, setup, on_accelerator: bool, capture: int, watch: dict | None = None,
           regions: list | None = None, eager: bool = True) -> _Traced:
    """Trace one training step with fake tensors on the CPU fake device, at the run's micro-batch and at
    another one: the difference is the per-sample slope (largest micro-batch that fits, fewest devices).

    A compiled module (``regions``) is traced compiled (:mod:`.tracing_compiled`). Its peak is affine in the
    micro-batch only from 3 on (the partitioner saves other tensors below), so the slope comes from two traces
    at 3 or more (the run's B and B + 4, or 4 and 8) and the run's own B is traced as it is. A compiled step
    that cannot be traced is traced eagerly (``eager=False``: left to the analytic forecast, which is eager),
    which forecasts more memory, and the notes say so."""
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
    overrides = {"foreach": True} if on_accelerator and setup.optimizer_impl == "foreach" else None
    manual = not module.automatic_optimization
    optimizers = list(trainer.optimizers) if manual else (trainer.optimizers[:1] or None)

    def trace(b, compiled: bool):
        tracer = trace_compiled_training_step_memory if compiled else trace_training_step_memory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tracer(module, b, lambda m, x: m.training_step(x, 0), optimizer_cls=torch.optim.SGD,
                          optimizer_kwargs={"lr": 0.0}, optimizer=optimizers, optimizer_overrides=overrides,
                          autocast_dtype=autocast, skip=(trainer,), manual=manual, watch=watch)
    B = setup.micro_batch_size
    notes = []
    if regions:
        try:
            first = trace(batch, True)
            at = (B, B + 4) if B >= 3 else (4, 8)
            line = {b: first if b == B else trace(resize_batch(batch, B, b), True) for b in at}
            per_sample = {k: (v - line[at[0]][k]) // (at[1] - at[0]) for k, v in line[at[1]].items()
                          if isinstance(v, int)}
            traced = _Traced(peak_memory_from_trace(first, setup, capture), first["train_flops"] // max(1, B),
                             COMPILED_METHOD, first, per_sample, None if at[0] == B else (at[0], line[at[0]]),
                             "compiled", [_compiled_note(regions)])
            return traced
        except Exception as err:  # noqa: BLE001 - said in the report; the eager trace is the safe side
            notes.append(f"compiled step could not be traced ({type(err).__name__}: {str(err)[:160]}): "
                         "forecast as eager, which is higher")
    if not eager:
        return _Traced(notes=notes)
    try:
        first = trace(batch, False)
    except Exception as err:  # noqa: BLE001 - tracing is best effort; say so in the report
        note = f"not traced ({type(err).__name__}: {str(err)[:120]}); activations not counted"
        return _Traced(peak_memory_from_trace(_model_state_only(module, setup), setup, capture), method=note,
                       notes=notes)
    other = 1 if B > 1 else 2
    try:
        second = trace(resize_batch(batch, B, other), False)
        per_sample = {k: (v - second[k]) // (B - other) for k, v in first.items() if isinstance(v, int)}
    except Exception:  # noqa: BLE001 - the step depends on the batch size: no slope, say so by its absence
        per_sample = None
    return _Traced(peak_memory_from_trace(first, setup, capture), first["train_flops"] // max(1, B), EAGER_METHOD,
                   first, per_sample, notes=notes)


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
