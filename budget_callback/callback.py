"""BudgetCallback: forecast at fit start, enforce budgets, stream exact snapshots of W."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from .validate import one_of, positive_int
from . import run_inputs as R
from .budgets import POLICIES
from .disk_guard import decide
from .errors import BudgetExceededError
from .forecast import Budgets, Forecast, Measured, PlanInputs, SnapshotSpec, forecast
from .memory import peak_memory_from_trace
from .report import render
from .shapes import ModelShape
from .storage import SNAPSHOT_DTYPES, SnapshotLayout
from .tracing import trace_training_step_memory
from .unembedding import MatrixSource, find_embedding, find_unembedding, is_tied
from .units import format_bytes, parse_size
from .wandb_panels import log_charts, log_events, log_forecast, log_summary_line, run_file_bytes, wandb_loggers
from .wandb_usage import CALLBACK_METRICS, CALLBACK_METRICS_ACCELERATOR, wandb_usage
from .writer import MANIFEST, WHEN_BEHIND, SnapshotWriter, clean_temporaries

STATE_VERSION = 1


class BudgetCallback(Callback):
    """Forecast memory, disk and W&B usage; guard the budgets; stream W to safetensors.

    See the README for every argument. Sizes take ints (bytes) or strings such
    as ``"12GB"`` (powers of 1000) or ``"12GiB"`` (powers of 1024).
    """

    def __init__(
        self,
        snapshot_dir: str | os.PathLike = "snapshots",
        save_every_n_steps: int = 1,
        snapshot_dtype: str = "bfloat16",
        snapshots_per_file: int = 1,
        unembedding: str | Callable[[torch.nn.Module], torch.Tensor] | None = None,
        include_embedding: bool = False,
        disk_budget: int | str | None = None,
        memory_budget: int | str | None = None,
        wandb_budget: int | str | None = None,
        on_exceed: str = "downsample",
        *,
        queue_depth: int = 4,
        when_behind: str = "wait",
        overwrite: bool = False,
        fsync: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(snapshot_dir, (str, os.PathLike)) or str(snapshot_dir) == "":
            raise ValueError(f"`snapshot_dir` must be a path (str or os.PathLike), got {snapshot_dir!r}")
        positive_int("save_every_n_steps", save_every_n_steps)
        one_of("snapshot_dtype", snapshot_dtype, SNAPSHOT_DTYPES)
        positive_int("snapshots_per_file", snapshots_per_file)
        if unembedding is not None and not isinstance(unembedding, str) and not callable(unembedding):
            raise ValueError(f"`unembedding` must be None, a parameter name or a callable, got {unembedding!r}")
        one_of("on_exceed", on_exceed, POLICIES)
        positive_int("queue_depth", queue_depth)
        one_of("when_behind", when_behind, WHEN_BEHIND)
        self.snapshot_dir = Path(snapshot_dir)
        self.requested_save_every_n_steps = save_every_n_steps
        self.save_every_n_steps = save_every_n_steps
        self.snapshot_dtype = snapshot_dtype
        self.snapshots_per_file = snapshots_per_file
        self.unembedding = unembedding
        self.include_embedding = bool(include_embedding)
        self.disk_budget = None if disk_budget is None else parse_size(disk_budget, "disk_budget")
        self.memory_budget = None if memory_budget is None else parse_size(memory_budget, "memory_budget")
        self.wandb_budget = None if wandb_budget is None else parse_size(wandb_budget, "wandb_budget")
        self.on_exceed = on_exceed
        self.queue_depth = queue_depth
        self.when_behind = when_behind
        self.overwrite = overwrite
        self.fsync = fsync
        self.verbose = verbose

        self.forecast: Forecast | None = None
        self.projected_bytes = 0
        self.events: list[dict] = []
        self._writer: SnapshotWriter | None = None
        self._sources: dict[str, MatrixSource] = {}
        self._layout: SnapshotLayout | None = None
        self._steps = 0
        self._last_seen_step = 0
        self._restored: dict | None = None
        self._bytes_before_resume = 0
        self._on_accelerator = False
        self._pinned: dict[str, list[torch.Tensor]] = {}
        self._submitted = 0
        self._wandb: list = []
        self._series: dict[str, list] = {}
        self._segments: list[tuple[int, int | None]] = []  # (from step, interval or None when paused)
        self._next_check_step = 1
        self._paused = False
        self._failed_seen = 0
        self._sharded = False
        self._tied = False
        self._last_step_time: float | None = None
        self._step_times: list[float] = []
        self._peak_flops: float | None = None
        self.stop_reason: str | None = None

    # --- public read-outs ----------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        """Snapshot bytes actually on disk (this fit's files plus those kept from before a resume)."""
        return self._bytes_before_resume + (self._writer.bytes_written if self._writer else 0)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(snapshot_dir=str(self.snapshot_dir))

    # --- setup ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.snapshot_dir.exists() and not self.snapshot_dir.is_dir():
            raise ValueError(f"`snapshot_dir` {str(self.snapshot_dir)!r} exists and is not a directory")
        if trainer.is_global_zero:
            parent = self.snapshot_dir if self.snapshot_dir.exists() else _existing_parent(self.snapshot_dir)
            if not os.access(parent, os.W_OK):
                raise ValueError(f"`snapshot_dir` {str(self.snapshot_dir)!r} is not writable")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # checkpoint state (load_state_dict) is restored before this hook, so a resume is known here
        resuming = self._restored is not None or trainer.ckpt_path is not None
        self._sources = self._locate(pl_module)
        V, D = self._sources["unembedding"].shape()
        self._layout = SnapshotLayout(V, D, self.snapshot_dtype, self.snapshots_per_file, self.include_embedding,
                                      self._tied)
        self._steps = R.total_steps(trainer)
        self._sharded = R.is_sharded(trainer, self._sources["unembedding"].get())
        batch = R.first_batch(trainer)  # every rank: loading the dataloader may hold a barrier
        # one rank decides, every rank learns the decision: none raises alone and leaves the others waiting
        decision: tuple[str | None, Forecast | None] = (None, None)
        if trainer.is_global_zero:
            try:
                if (self.snapshot_dir / MANIFEST).exists() and not resuming and not self.overwrite:
                    raise ValueError(
                        f"`snapshot_dir` {str(self.snapshot_dir)!r} already holds snapshots of another run; "
                        "choose another directory, resume with trainer.fit(..., ckpt_path=...), "
                        "or pass BudgetCallback(overwrite=True) to replace them")
                decision = (None, self._forecast(trainer, pl_module, batch))
            except ValueError as err:
                decision = (str(err), None)
        error, result = trainer.strategy.broadcast(decision, src=0)
        if error is not None:
            raise ValueError(error)
        self.forecast = result
        if self._restored:  # resumed: keep the interval the run already uses, no second surprise
            self.save_every_n_steps = int(self._restored["save_every_n_steps"])
            self._last_seen_step = int(self._restored["global_step"])
        else:
            self.save_every_n_steps = result.save_every_n_steps
        self._segments = [(1, self.save_every_n_steps)]
        self._next_check_step = self._last_seen_step + 1
        self.projected_bytes = self._projected_due(self._steps)
        if trainer.is_global_zero:
            if self.verbose:
                rank_zero_info(self._report(result))
            self._wandb = wandb_loggers(trainer.loggers)
            log_forecast(self._wandb, result, trainer.global_step)
        if result.decision == "abort":
            failed = [v.line() for v in result.verdicts.values() if not v.fits]
            raise BudgetExceededError(
                "budget-callback: the run does not fit its budget, nothing was written. " + " | ".join(failed))
        if result.decision == "warn":
            failed = [v.line() for v in result.verdicts.values() if not v.fits]
            warnings.warn("budget-callback: " + " | ".join(failed), stacklevel=2)
        if trainer.is_global_zero:
            self._start_writer(trainer)

    def _locate(self, pl_module: pl.LightningModule) -> dict[str, MatrixSource]:
        w = find_unembedding(pl_module, self.unembedding)
        e = find_embedding(pl_module)
        self._tied = is_tied(w, e)
        sources = {"unembedding": w}
        if self.include_embedding:
            if e is None:
                raise ValueError("`include_embedding=True` but no input embedding was found "
                                 "(tried get_input_embeddings() and nn.Embedding layers)")
            if not self._tied:
                sources["embedding"] = e
        return sources

    def _forecast(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch) -> Forecast:
        declared = R.find_shape(pl_module)
        shape = declared
        memory_default, self._on_accelerator = R.memory_budget_default(pl_module)
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        optimizer, momentum, impl, opt = R.optimizer_settings(trainer, self._on_accelerator)
        dims = R.batch_dims(batch) or (1, None)
        V, D = self._sources["unembedding"].shape()
        if shape is None:  # stand-in: only V, D and tying are used (storage); memory and FLOPs are traced
            shape = ModelShape(vocab_size=V, d_model=D, n_layer=1, n_head=1, n_ctx=dims[1] or 1, tied=self._tied,
                               name=type(pl_module).__name__)
        setup = R.train_setup(trainer, dims[0], dims[1] or shape.n_ctx, optimizer, momentum, impl)
        on_gpu = device.type == "cuda"
        spec, ckpt_dirs = R.logging_spec(trainer, self._steps,
                                         CALLBACK_METRICS_ACCELERATOR if on_gpu else CALLBACK_METRICS)
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        shares = any(R.same_file_system(self.snapshot_dir, d) for d in ckpt_dirs) if ckpt_dirs else True
        inputs = PlanInputs(
            shape=shape,
            setup=setup,
            steps=self._steps,
            snapshot=SnapshotSpec(self.requested_save_every_n_steps, self.snapshot_dtype, self.snapshots_per_file,
                                  self.include_embedding, self.queue_depth),
            logging=spec,
            budgets=Budgets(self.disk_budget, self.memory_budget or memory_default or None, self.wandb_budget,
                            self.on_exceed),
            checkpoints_share_disk=shares,
            gpu=R.gpu_table_name(device),
        )
        compute = {"32-true": torch.float32, "16-mixed": torch.float16, "16-true": torch.float16}.get(
            setup.precision, torch.bfloat16)
        self._peak_flops = R.device_peak_flops(device, compute)
        n_params, n_tensors = R.module_counts(pl_module)
        entries = R.state_dict_entries(pl_module)
        memory, flops, method = None, None, "analytic transformer"
        if declared is None:
            memory, flops, method = self._trace(trainer, pl_module, batch, setup, opt)
        measured = Measured(n_params, n_tensors, entries, memory, flops, method)
        free = shutil.disk_usage(self.snapshot_dir).free
        result = forecast(inputs, measured, free_disk_bytes=free)
        if self._restored:
            result.notes.append(f"resumed at step {self._restored.get('global_step')}: "
                                f"keeping save_every_n_steps={self._restored['save_every_n_steps']}")
        return result

    def _trace(self, trainer, pl_module, batch, setup, opt):
        """Trace one training step with fake tensors on the CPU fake device."""
        autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(setup.precision)
        kwargs = dict(opt.defaults) if opt is not None else {}
        if self._on_accelerator and setup.optimizer_impl == "foreach":
            kwargs["foreach"] = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trace = trace_training_step_memory(
                    pl_module, batch, lambda m, b: m.training_step(b, 0),
                    optimizer_cls=type(opt) if opt is not None else torch.optim.SGD,
                    optimizer_kwargs=kwargs, autocast_dtype=autocast, skip=(trainer,))
        except Exception as err:  # noqa: BLE001 - tracing is best effort; say so in the report
            note = f"not traced ({type(err).__name__}: {str(err)[:120]}); activations not counted"
            return peak_memory_from_trace(_model_state_only(pl_module, setup), setup), None, note
        memory = peak_memory_from_trace(trace, setup)
        per_sequence = trace["train_flops"] // max(1, setup.micro_batch_size)
        return memory, per_sequence, "traced training step (fake tensors, cpu fake device)"

    def _report(self, f: Forecast) -> str:
        lines = ["budget-callback forecast", render(f)]
        return "\n".join(lines)

    def _start_writer(self, trainer: pl.Trainer) -> None:
        removed = clean_temporaries(self.snapshot_dir)
        if removed:
            self.events.append({"step": trainer.global_step, "event": "cleaned_temporaries", "count": len(removed)})
        resume_intervals = None
        start_step = 0
        if self._restored:
            start_step = int(self._restored.get("global_step", 0))
            resume_intervals = self._restored.get("intervals")
            self._bytes_before_resume = _truncate_after(self.snapshot_dir, start_step)
        elif self.overwrite:
            _truncate_after(self.snapshot_dir, 0)
        self._writer = SnapshotWriter(self.snapshot_dir, self._layout, self.save_every_n_steps, self.queue_depth,
                                      self.when_behind, self.fsync,
                                      manifest_extra={"requested_save_every_n_steps": self.requested_save_every_n_steps})
        self._writer.last_step = start_step
        self._writer.start(resume_intervals)

    # --- during the run ------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:
            return  # accumulating: no optimizer step happened
        self._last_seen_step = step
        if self._writer is not None:
            self._writer.check()  # a dead writer surfaces here, at the next step, with its cause
            if self._writer.stats.failed > self._failed_seen and trainer.world_size == 1:
                self._next_check_step = step  # a write hit a full disk: look now (one process: no collective)
            self._failed_seen = self._writer.stats.failed
        if step >= self._next_check_step and not self._paused and self.stop_reason is None:
            self._guard(trainer, step)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self._step_times.append(now - self._last_step_time)
        self._last_step_time = now
        if not self._paused and step % self.save_every_n_steps == 0 and (self._writer is not None or self._sharded):
            self._snapshot(trainer, step)
        if step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, step)

    def _projected_due(self, step: int) -> int:
        """Forecast snapshot bytes written by ``step``, following every interval change."""
        total = 0
        for i, (start, every) in enumerate(self._segments):
            end = self._segments[i + 1][0] - 1 if i + 1 < len(self._segments) else self._steps
            if every is not None and start <= step:
                total += self._layout.series_bytes(min(step, end), every, start_step=start - 1)
        return total

    def _guard(self, trainer: pl.Trainer, step: int) -> None:
        """Re-check free space; raise the interval, pause, or stop before the disk is full."""
        decision = None
        if trainer.is_global_zero and self._writer is not None:
            free = shutil.disk_usage(self.snapshot_dir).free
            budget_left = None if self.disk_budget is None else self.disk_budget - self.bytes_written
            decision = decide(self._layout, self._steps, step, self.save_every_n_steps, free, budget_left,
                              self._writer.pending_bytes, self.on_exceed)
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision is None:
            return
        self._next_check_step = decision.next_check_step
        if decision.action == "ok":
            return
        event = decision.to_event(step)
        if decision.action == "raise_interval":
            self.save_every_n_steps = decision.every
            self._segments.append((step + 1, decision.every))
            if self._writer is not None:
                self._writer.set_interval(decision.every, step + 1)
        elif decision.action == "pause":
            self._paused = True
            self._segments.append((step + 1, None))
        elif decision.action == "stop":
            self.stop_reason = (f"budget-callback: disk guard stopped the run at step {step}: "
                                f"{format_bytes(decision.available_bytes)} left for snapshots, "
                                f"{format_bytes(decision.needed_bytes)} needed for the rest")
            trainer.should_stop = True
        elif decision.action == "warn":
            if any(e["event"] == event["event"] for e in self.events):
                return
            warnings.warn(f"budget-callback: the remaining snapshots need {format_bytes(decision.needed_bytes)}, "
                          f"{format_bytes(decision.available_bytes)} is left", stacklevel=2)
        self.events.append(event)
        self.projected_bytes = self._projected_due(self._steps)
        self._log(trainer, step)

    def _snapshot(self, trainer: pl.Trainer, step: int) -> None:
        with self._full_params(trainer):
            if self._writer is None:  # another rank: take part in the gather only
                for source in self._sources.values():
                    if hasattr(source.get(), "full_tensor"):
                        source.matrix()
                return
            self._capture(step)

    @contextlib.contextmanager
    def _full_params(self, trainer: pl.Trainer):
        """FSDP (1): every rank gathers, rank 0 reads. Anything else: nothing to do here."""
        if self._sharded and R.strategy_name(trainer) == "fsdp" and trainer.strategy.model is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if any(isinstance(m, FSDP) for m in trainer.strategy.model.modules()):
                with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True):
                    yield
                return
        yield

    def _capture(self, step: int) -> None:
        tensors, event = {}, None
        dtype = getattr(torch, self.snapshot_dtype)
        for name, source in self._sources.items():
            w = source.matrix()
            if w.device.type == "cuda":
                ring = self._pinned.setdefault(name, [])
                if not ring:
                    ring.extend(torch.empty(w.shape, dtype=dtype, pin_memory=True)
                                for _ in range(self.queue_depth + 2))
                buf = ring[self._submitted % len(ring)]
                buf.copy_(w.to(dtype), non_blocking=True)
                tensors[name] = buf
            else:
                tensors[name] = w.to(dtype=dtype, copy=True)
        if any(t.is_pinned() for t in tensors.values()):
            event = torch.cuda.Event()
            event.record()
        self._writer.submit(step, tensors, event)
        self._submitted += 1

    def _metrics(self, trainer: pl.Trainer, step: int) -> dict[str, float | int]:
        f = self.forecast
        metrics: dict[str, float | int] = {
            "budget/disk_projected_bytes": self._projected_due(step),
            "budget/disk_actual_bytes": self.bytes_written,
            "budget/save_every_n_steps": self.save_every_n_steps,
        }
        if self._writer is not None:
            metrics["budget/writer_backpressure_seconds"] = round(self._writer.stats.backpressure_seconds, 6)
            metrics["budget/snapshots_dropped"] = self._writer.stats.dropped
            metrics["budget/snapshots_failed"] = self._writer.stats.failed
        if self._step_times:
            seconds = statistics.median(self._step_times[-max(1, trainer.log_every_n_steps):])
            metrics["budget/step_seconds"] = round(seconds, 6)
            if self._peak_flops and f is not None:
                world = trainer.world_size
                metrics["budget/mfu"] = round(f.flops["train_per_step"] / seconds / (self._peak_flops * world), 6)
                metrics["budget/mfu_projected"] = f.inputs.mfu
                metrics["budget/step_seconds_projected"] = round(
                    f.flops["train_per_step"] / (self._peak_flops * world * f.inputs.mfu), 6)
        if self._on_accelerator and torch.cuda.is_available() and f is not None:
            metrics["budget/memory_projected_bytes"] = f.memory["peak_bytes"]
            metrics["budget/memory_actual_bytes"] = int(torch.cuda.max_memory_allocated())
        return metrics

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = self._metrics(trainer, step)
        events = self.events + (self._writer.stats.events if self._writer else [])
        metrics["budget/events"] = len(events)
        self._record(step, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _record(self, step: int, metrics: dict) -> None:
        """Keep the projected and actual points for the end-of-fit charts (a repeated step is updated)."""
        if not self._wandb:
            return
        point = {"disk_projected": metrics["budget/disk_projected_bytes"],
                 "disk_actual": metrics["budget/disk_actual_bytes"]}
        if "budget/memory_actual_bytes" in metrics:
            point["memory_projected"] = metrics["budget/memory_projected_bytes"]
            point["memory_actual"] = metrics["budget/memory_actual_bytes"]
        actual = run_file_bytes(self._wandb[0])
        if actual is not None and self.forecast is not None:
            f = self.forecast
            point["wandb_projected"] = wandb_usage(f.inputs.logging, min(step, self._steps),
                                                   f.storage["checkpoint_bytes"])["run_file_bytes"]
            point["wandb_actual"] = actual
        s = self._series
        repeat = bool(s.get("step")) and s["step"][-1] == step
        if not repeat:
            s.setdefault("step", []).append(step)
        for key, value in point.items():
            values = s.setdefault(key, [])
            if repeat and len(values) == len(s["step"]):
                values[-1] = value
            else:
                values.append(value)

    # --- end of fit ----------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._writer is None:
            return
        try:
            self._finish(trainer, failed=True)
        except Exception as err:  # noqa: BLE001 - the original exception matters more
            warnings.warn(f"budget-callback: could not flush snapshots after {exception!r}: {err!r}", stacklevel=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None and stage == "fit":
            self._writer.close()

    def _finish(self, trainer: pl.Trainer, failed: bool = False) -> None:
        if self._writer is None or self._writer._closed:
            return
        self._writer.close()
        step = trainer.global_step
        self._log(trainer, step)
        reason = " (run stopped by an exception)" if failed else ""
        if self.stop_reason:
            reason = f" ({self.stop_reason})"
        line = self.summary(step) + reason
        if self._wandb:
            log_charts(self._wandb, self._series, step)
            log_events(self._wandb, self.events + self._writer.stats.events, step)
            log_summary_line(self._wandb, line)
        if trainer.is_global_zero:
            rank_zero_info(line)

    def summary(self, step: int | None = None) -> str:
        """One line: projected vs actual snapshot bytes, and the interval."""
        step = self._steps if step is None else step
        due = self._projected_due(step) if self._layout else 0
        actual = self.bytes_written
        diff = actual - due
        stats = self._writer.stats if self._writer else None
        extra = ""
        if stats is not None:
            extra = (f"; back-pressure {stats.backpressure_seconds:.2f} s, dropped {stats.dropped}, "
                     f"lost to a full disk {stats.failed}")
        files = stats.files_written if stats is not None else 0
        return (f"budget-callback summary: snapshots projected {format_bytes(due)} ({due:,} B) by step {step}, "
                f"actual {format_bytes(actual)} ({actual:,} B) in {files} file(s), difference {diff:+,} B; "
                f"save_every_n_steps={self.save_every_n_steps}{' (paused)' if self._paused else ''}{extra}")

    # --- checkpoint state ----------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Every snapshot up to the checkpoint's step is on disk before the checkpoint is (no gaps on resume)."""
        if self._writer is not None and not self._writer._closed:
            self._writer.flush(final=False)

    def state_dict(self) -> dict[str, Any]:
        writer = self._writer
        return {
            "version": STATE_VERSION,
            "save_every_n_steps": self.save_every_n_steps,
            "bytes_written": self.bytes_written,
            "last_snapshot_step": writer.last_step if writer else 0,
            "global_step": self._last_seen_step,
            "intervals": list(writer._intervals) if writer else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {
            "save_every_n_steps": int(state_dict.get("save_every_n_steps", self.save_every_n_steps)),
            "global_step": int(state_dict.get("global_step", 0)),
            "intervals": state_dict.get("intervals") or None,
        }


def _model_state_only(module: torch.nn.Module, setup) -> dict:
    """A trace-shaped record with parameters, gradients and optimizer state only (when tracing failed)."""
    from .precision import optimizer_states_per_param

    p = setup.prec.param_bytes
    trainable = sum(t.numel() for t in module.parameters() if t.requires_grad)
    frozen = sum(t.numel() for t in module.parameters() if not t.requires_grad)
    params, grads = p * (trainable + frozen), p * trainable
    state = optimizer_states_per_param(setup.optimizer, setup.momentum) * p * trainable
    persistent = params + state
    return {"params_bytes": params, "buffers_bytes": 0, "gradients_bytes": grads, "optimizer_state_bytes": state,
            "forward_peak_bytes": persistent, "backward_peak_bytes": persistent,
            "optimizer_peak_bytes": persistent + grads}


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _truncate_after(directory: Path, step: int) -> int:
    """Delete snapshot files whose first step is after ``step``; return the bytes of those kept.

    A crashed run may have written snapshots after its last checkpoint; the
    resumed run writes them again, so the old ones are replaced, never mixed.
    A stacked file that straddles ``step`` is kept only up to ``step`` by
    rewriting it without the later slices.
    """
    from .reader import read_header
    from .writer import is_temporary

    kept = 0
    if not directory.is_dir():
        return 0
    for entry in os.scandir(directory):
        if not entry.name.endswith(".safetensors") or is_temporary(entry.name) or entry.name.startswith("."):
            continue
        meta = read_header(entry.path).get("__metadata__") or {}
        if "first_step" not in meta:
            continue
        first, count, every = int(meta["first_step"]), int(meta["count"]), int(meta["every"])
        last = first + (count - 1) * every
        if first > step:
            os.unlink(entry.path)
        elif last > step:
            _cut_stacked(Path(entry.path), (step - first) // every + 1, every)
            kept += os.path.getsize(entry.path)
        else:
            kept += entry.stat().st_size
    return kept


def _cut_stacked(path: Path, keep: int, every: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_slice(k)[:keep] for k in fh.keys()}
    meta["count"] = str(keep)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
