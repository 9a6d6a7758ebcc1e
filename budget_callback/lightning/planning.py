"""The fit-start forecast: gather plain inputs from the Trainer and the module, measure its step
(:mod:`.measure`), forecast.

No decision is acted on here; :mod:`.session` applies the forecast's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import lightning.pytorch as pl
import torch

from ..forecast.console import REPORT_CHARS
from ..forecast.engine import Budgets, Forecast, PlanInputs, SnapshotSpec, forecast
from ..forecast.report import REPORT_TITLE, render
from ..forecast.shapes import ModelShape
from ..forecast.wandb_usage import CALLBACK_METRICS, CALLBACK_METRICS_ACCELERATOR
from ..snapshots.format import SnapshotLayout
from . import inputs as R
from .config import BudgetConfig
from .locate import MatrixSource
from .measure import StepContext, measure_module
from .sharding import sharded_model
from .step_order import StepOrder
from .torch_internals import storage_key


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
             resume: dict | None, free_disk_bytes: int, sources: dict[str, MatrixSource] | None = None,
             host_ram_bytes: int | None = None) -> Forecast:
    """The forecast for this fit (rank 0): analytic for a module that declares its shape, else traced. A traced
    step also says whether it writes the matrices of ``sources`` in place (``model["written_in_step"]``).
    ``host_ram_bytes``: the host RAM available now, which caps the snapshot ring (``storage.host_buffer_*``)."""
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
                              config.include_embedding, config.queue_depth, host_ram_bytes),
        logging=spec,
        budgets=Budgets(config.disk_budget, config.memory_budget or memory_default or None, config.wandb_budget,
                        config.on_exceed),
        checkpoints_share_disk=shares, gpu=R.gpu_table_name(device), steps_per_batch=facts.steps_per_batch,
        resume=resume, capture_device_bytes=facts.capture_device_bytes, strategy_name=R.strategy_label(trainer),
    )
    order = StepOrder.of_lightning(trainer, module)
    ctx = StepContext(setup, layout, order,
                      list(trainer.optimizers) if order.manual else (trainer.optimizers[:1] or None), on_accelerator,
                      facts.capture_device_bytes, _own_parameters(module, sources),
                      sharded_model(module, setup.world_size), compiled_slope=False)
    measured, notes = measure_module(module, batch, ctx, declared)
    result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    if measured.mode == "compiled" and measured.trace_per_sample is None and result.verdicts["memory"].exceeds:
        # the advice needs the largest micro-batch that fits: worth two more compiles on a run that stops here
        measured, notes = measure_module(module, batch, replace(ctx, compiled_slope=True), declared)
        result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    if config.verbose:  # the report W&B will capture is this forecast's own: count its real length
        exact = replace(console, report_chars=len(REPORT_TITLE) + 1 + len(render(result)))
        inputs = replace(inputs, logging=replace(inputs.logging, console=exact))
        result = forecast(inputs, measured, free_disk_bytes=free_disk_bytes)
    result.notes.extend(notes)
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


