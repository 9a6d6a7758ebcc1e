"""One fit, from ``setup`` to ``teardown``: every piece of per-fit state lives here and starts fresh.

The callback's hooks each call one method. The work is done by components
that know nothing of each other: the forecast (:mod:`.planning`), the series
and its directory (:mod:`budget_callback.snapshots`), the capture of W
(:mod:`.capture`), the writer, the disk guard's pure decision, the tracker.
Decisions are made on rank 0 and shared (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing.util
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from ..errors import BudgetExceededError, SnapshotWriteError
from ..forecast import disk_guard
from ..forecast.engine import Forecast
from ..forecast.report import REPORT_TITLE, render
from ..forecast.wandb_usage import staging_bytes_after
from ..snapshots.format import MANIFEST, SnapshotLayout, ring_cap, ring_size
from ..snapshots.schedule import Schedule
from ..snapshots.directory import scan
from ..snapshots.series import Series, SeriesPlan, new_run_id, prepare, restored_series
from ..snapshots.writer import SnapshotWriter
from ..units import format_bytes
from . import inputs as R
from .capture import Capture
from .config import BudgetConfig
from .distributed import decide_on_rank_zero, on_every_rank
from .notice import FailureNotice, new_token
from .locate import MatrixSource, choice_note, find_embedding, find_unembedding, is_tied
from .planning import FitFacts, capture_device_bytes, plan_fit
from .summary import NOT_STARTED, idle_line, series_line
from .torch_internals import graph_break_counts
from .tracking import RunTracker, logger_step, should_log
from .wandb_panels import log_charts, log_events, log_forecast, log_summary_line, wandb_loggers


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


class FitSession:
    """Everything one fit does with the snapshot series (see the module doc)."""

    def __init__(self, config: BudgetConfig, launch_token: str) -> None:
        from ..snapshots.directory import DirectoryLock

        self.config = config
        self.launch_token = launch_token
        self.lock = DirectoryLock(config.snapshot_dir)
        self.restored: dict | None = None  # this fit's checkpoint state for the callback (load_state_dict)
        self.checkpoint_dirs: list[str] | None = None  # snapshot_dirs a loaded checkpoint has BudgetCallback state for
        self.forecast: Forecast | None = None
        self.series: Series | None = None  # rank 0
        self.schedule: Schedule | None = None  # every rank (rank 0: the series' own)
        self.writer: SnapshotWriter | None = None
        self.capture: Capture | None = None
        self.tracker: RunTracker | None = None
        self.facts: FitFacts | None = None
        self.next_check_step = 0
        self.stop_reason: str | None = None
        self.final_projected: int | None = None
        self.idle: dict | None = None  # a fit in which no batch ran: the series as its checkpoint left it
        self._past_forecast = False
        self._at_exit = None  # multiprocessing.util.Finalize: runs at exit in spawned workers too (atexit does not)
        self._lost_seen = 0
        self._warned = False
        self.run_id = new_run_id()  # a new series' id, known before it starts (a checkpoint may be taken before)
        self._in_step = False  # inside this callback's batch end (a signal handler may checkpoint there)
        self._flush_after_step = False
        self._finished = False
        self._overflow_warned = False
        self._graph_breaks: dict[str, int] | None = None  # dynamo's graph breaks at fit start, a compiled run
        self.notice: FailureNotice | None = None
        self._copy_error: BaseException | None = None
        self.reported: dict | None = None  # rank 0's end-of-fit figures, on every rank
        self.scratch: Path | None = None  # fast_dev_run: the series goes to this directory, removed at teardown
        self.smoke = False  # a fast_dev_run fit

    # --- setup: checks that need no run, and the lock ---------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        from ..snapshots.directory import DirectoryLock

        def check() -> None:
            directory = self.config.snapshot_dir
            if directory.exists() and not directory.is_dir():
                raise ValueError(f"`snapshot_dir` {str(directory)!r} exists and is not a directory")
            parent = _existing_parent(directory)
            if not parent.is_dir():
                raise ValueError(f"`snapshot_dir` {str(directory)!r} cannot be made: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"`snapshot_dir` {str(directory)!r} is not writable")
            if trainer.fast_dev_run:  # a smoke test runs everything but owns no series: a scratch directory beside
                self.scratch = Path(tempfile.mkdtemp(prefix=".budget-callback-fast-dev-run-", dir=parent))
                self.config = dataclasses.replace(self.config, snapshot_dir=self.scratch)
                self.lock = DirectoryLock(self.scratch)
            self.lock.acquire()
            # Lightning calls no hook in a ddp_spawn worker whose fit raised: finish there as the process exits
            self._at_exit = multiprocessing.util.Finalize(self, FitSession._abandoned, args=(weakref.ref(self),),
                                                          exitpriority=100)
        self.smoke = bool(trainer.fast_dev_run)
        decide_on_rank_zero(trainer.strategy, check)

    @staticmethod
    def _abandoned(ref: weakref.ref) -> None:
        """The process exits and Lightning never ended this fit: write what was captured, mark the manifest
        failed, release the lock (the same as ``on_exception`` then ``teardown``)."""
        self = ref()
        if self is None:
            return
        try:
            if self.notice is not None:
                self.notice.close()
            if self.writer is not None and not self.writer.closed:
                try:
                    self.capture.close()
                finally:
                    self.writer.close()
                    self.series.write_manifest("failed")
        finally:
            self.lock.release()
            self._remove_scratch()

    # --- before the first step: forecast, decide, open the series, start the writer ---------------------------
    def start(self, trainer: pl.Trainer, module: pl.LightningModule, batch) -> None:
        """Before the first training step (the first ``on_train_batch_start``: checkpoint state is restored
        under every strategy, and ``batch`` is the run's own first batch: nothing is drawn from the data
        and no random state is touched)."""
        strategy = trainer.strategy
        sources, layout, sharded = on_every_rank(strategy, lambda: self._locate(trainer, module))
        stride = R.steps_per_batch(trainer, module)
        facts = FitFacts(layout, stride, on_every_rank(strategy, lambda: R.final_step(trainer, stride)),
                         trainer.global_step, sharded, R.memory_budget_default(module)[1],
                         capture_device_bytes(sources, layout, sharded))
        plan: SeriesPlan | None = None

        def decide() -> Forecast:
            nonlocal plan
            plan = self._prepare(layout)
            if choice_note(sources["unembedding"]):  # one of several candidates: say which, and how to choose
                plan.warnings.append(choice_note(sources["unembedding"]))
            ram = available_ram_bytes()
            self._check_host_ram(layout, ram)
            free = shutil.disk_usage(_existing_parent(self.config.snapshot_dir)).free + plan.reclaimable_bytes
            resume = plan.schedule.state() if plan.schedule is not None else None
            return plan_fit(trainer, module, self.config, facts, batch, resume, free, sources, ram)

        self.forecast = result = decide_on_rank_zero(strategy, decide)
        self.facts = facts
        if trainer.is_global_zero and self.config.verbose:
            rank_zero_info(REPORT_TITLE + "\n" + render(result))
        wandb = wandb_loggers(trainer.loggers) if trainer.is_global_zero else []
        log_forecast(wandb, result, logger_step(trainer))
        failed = [v.line() for v in result.verdicts.values() if not v.fits]
        if result.decision == "abort":
            raise BudgetExceededError("budget-callback: the run does not fit its budget, nothing was written. "
                                      + " | ".join(failed))
        if result.decision in ("warn", "unknown"):
            warnings.warn("budget-callback: " + " | ".join(failed), stacklevel=2)
        for verdict in result.verdicts.values():  # an estimate is said where the user looks, too
            if verdict.known and verdict.basis and verdict.checked:
                warnings.warn(f"budget-callback: {verdict.line()}", stacklevel=2)
        opened = decide_on_rank_zero(strategy, lambda: self._open(trainer, plan, result, layout, stride))
        self.schedule = self.series.schedule if self.series else Schedule.from_state(layout, opened["schedule"])
        if trainer.world_size > 1:  # rank 0's writer failure reaches every rank (see .notice)
            self.notice = FailureNotice(trainer.global_rank, trainer.world_size, opened["notice"])
            if self.writer is not None:
                self.writer.hold_errors = self.notice.available
        writers = R.weight_writers(trainer, module)
        writers += [f"{type(module).__name__}.training_step writes {name} in place (seen in the traced step)"
                    for name in (result.model or {}).get("written_in_step", [])]
        self.capture = Capture(sources, layout, result.storage["host_buffer_images"], writes=self.writer is not None,
                               gather=R.full_params(trainer, sharded), when_behind=self.config.when_behind,
                               overlap=not writers, on_torn=self._torn if self.series else None)
        if writers and self.series is not None:
            self.series.event({"step": trainer.global_step, "event": "copy_guarded",
                               "reason": "code between the steps may change W: " + ", ".join(writers[:5])})
        self._graph_breaks = graph_break_counts() if result.memory.get("mode") == "compiled" else None
        self.tracker = RunTracker(result, R.module_peak_flops(trainer, module), facts.on_accelerator, wandb)
        self.next_check_step = trainer.global_step + 1
        if self.schedule.last_step < trainer.global_step:
            # the checkpoint was written after its step's optimizer update, before this callback recorded that batch
            # end: the restored W is W after that step, so its snapshot, if due, is taken from it now
            with self._recording():
                self._take(trainer.global_step)

    def _locate(self, trainer: pl.Trainer, module: pl.LightningModule
                ) -> tuple[dict[str, MatrixSource], SnapshotLayout, bool]:
        w = find_unembedding(module, self.config.unembedding)
        e = find_embedding(module)
        tied = is_tied(w, e)
        sources = {"unembedding": w}
        if self.config.include_embedding:
            if e is None:
                raise ValueError("`include_embedding=True` but no input embedding was found "
                                 "(tried get_input_embeddings() and nn.Embedding layers)")
            if not tied:
                sources["embedding"] = e
        V, D = w.shape()
        layout = SnapshotLayout(V, D, self.config.snapshot_dtype, self.config.snapshots_per_file,
                                self.config.include_embedding, tied)
        return sources, layout, R.is_sharded(trainer, w.get())

    def _prepare(self, layout: SnapshotLayout) -> SeriesPlan:
        hint = ""
        if self.checkpoint_dirs is not None and self.restored is None:
            known = ", ".join(self.checkpoint_dirs) or "none"
            hint = (f"The checkpoint being resumed has no BudgetCallback state for this snapshot_dir (it has "
                    f"state for: {known}).")
        own = (self.restored or {}).get("pending_run_id")  # a checkpoint its run wrote before its series started
        return prepare(self.config.snapshot_dir, layout, restored_series(self.restored), self.config.overwrite, hint,
                       run_id=own or self.run_id, own_run_id=own, asked_every=self.config.save_every_n_steps)

    def _check_host_ram(self, layout: SnapshotLayout, available: int | None) -> None:
        """Refuse a run whose snapshot ring does not fit the host RAM available even at its fewest buffers."""
        ring = ring_cap(layout, self.config.queue_depth, available)
        if available is not None and ring.total_bytes > available:
            raise ValueError(
                f"`snapshots_per_file`={layout.snapshots_per_file} and `queue_depth`={self.config.queue_depth} need "
                f"{format_bytes(ring.total_bytes)} of host RAM for snapshot buffers ({ring.basis}; "
                f"{format_bytes(layout.step_bytes)} per snapshot), {format_bytes(available)} is available: lower "
                "snapshots_per_file")

    def _open(self, trainer: pl.Trainer, plan: SeriesPlan, result: Forecast, layout: SnapshotLayout,
              stride: int) -> dict:
        """Rank 0: apply the plan, start the series and the writer; the schedule's state for the other ranks."""
        if plan.schedule is not None:
            schedule = plan.schedule
            if schedule.every != result.save_every_n_steps:
                schedule.change_interval(result.save_every_n_steps)
        else:
            schedule = Schedule.start(layout, result.save_every_n_steps, stride, trainer.global_step)
        self.series, removed, open_file = plan.commit(schedule, self.launch_token, self.config.fsync,
                                                      self.config.save_every_n_steps)
        step = trainer.global_step
        if removed:
            self.series.event({"step": step, "event": "cleaned_temporaries", "count": len(removed),
                               "names": removed[:5]})
        if result.decision == "downsampled":
            self.series.event({"step": step, "event": "interval_raised_at_start",
                               "from": self.config.save_every_n_steps, "every": result.save_every_n_steps})
        if result.storage["host_buffer_images"] < ring_size(self.config.queue_depth):  # the host RAM share binds
            st = result.storage
            self.series.event({"step": step, "event": "snapshot_ring_capped", "buffers": st["host_buffer_images"],
                               "bytes": st["host_buffer_bytes"], "basis": st["host_buffer_basis"]})
        for text in plan.warnings:
            warnings.warn(f"budget-callback: {text}", stacklevel=2)
            self.series.event({"step": step, "event": "warning", "detail": text})
        self.writer = SnapshotWriter(self.series)
        self.writer.start(open_file)
        return {"schedule": schedule.state(), "notice": new_token()}

    # --- every batch end --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _recording(self):
        """A batch end being recorded: a checkpoint written meanwhile (by a signal handler, or after an exception
        raised in it) carries the series before it (:meth:`Series.begin_step`)."""
        if self.series is not None:
            self.series.begin_step()
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
        if self.series is not None:
            self.series.end_step()
        if self._flush_after_step:
            self._flush_after_step = False
            self.before_checkpoint()

    def _take(self, step: int) -> None:
        """Record the batch end at ``step`` in the schedule and take its snapshot if one is due."""
        placement = self.series.place(step) if self.series else self.schedule.advance(step)
        if placement is not None and (self.writer is not None or self.facts.sharded):
            writer = self.writer

            def ready(image, event, release):
                writer.submit(placement, image, event, release)
            # every rank takes part in gathering a sharded W; the writing rank copies off the training thread
            with self._holding_copy_errors():
                if not self.capture.take(ready, placement.step, placement.every) and self.writer is not None:
                    self.series.record_dropped(step)

    def on_step(self, trainer: pl.Trainer) -> None:
        with self._recording():
            self._batch_end(trainer)

    def _batch_end(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        self._stop_if_rank_zero_failed(step)
        stepped = step > self.schedule.last_step
        if stepped:
            self.tracker.tick()
        self._take(step)
        if self.series is not None and trainer.world_size == 1 and self.series.lost > self._lost_seen:
            self._lost_seen = self.series.lost  # a write hit a full disk: look again now (one process only)
            self.next_check_step = step
        self._warn_overflow()
        if stepped and self._graph_breaks is not None:
            self._check_graph_breaks(step)
        if stepped and step > self.facts.final_step and not self._past_forecast:
            self._ran_past_forecast(step)
        if stepped and step >= self.next_check_step and not self.schedule.paused and self.stop_reason is None:
            self._guard(trainer, step)
        if stepped and should_log(trainer):
            self._log(trainer, logger_step(trainer))

    def _check_graph_breaks(self, step: int) -> None:
        """After the first compiled step: the fit-start forecast traced each compiled region as one graph; a
        graph break (dynamo compiled the step in pieces) can make the step need more, which is said once."""
        before, self._graph_breaks = self._graph_breaks, None
        now = graph_break_counts()
        new = {k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)}
        if not new:
            return
        reasons = "; ".join(f"{k[:80]} (x{v})" for k, v in list(new.items())[:3])
        text = (f"the compiled step has {sum(new.values())} graph break(s) ({reasons}): the fit-start forecast "
                "traced each compiled region as one graph, and pieces (or frames run eagerly) can keep more alive; "
                "the memory forecast may be low (the eager forecast is the safe bound: drop torch.compile for it, "
                "or remove the breaks, torch._dynamo.explain shows them)")
        warnings.warn(f"budget-callback: {text}", stacklevel=2)
        if self.series is not None:
            self.series.event({"step": step, "event": "compiled_graph_breaks", "count": sum(new.values()),
                               "reasons": list(new)[:5]})

    def _stop_if_rank_zero_failed(self, step: int) -> None:
        """Several ranks: rank 0's writer failure stops every rank at the same batch end, with its cause."""
        if self.notice is not None:
            self.notice.stop_if_failed(step, (self.writer.error or self._copy_error) if self.writer else None)

    def _warn_overflow(self) -> None:
        """Once per fit, on the training thread: float16 snapshots hold infinities where W did not."""
        if self.series is None or not self.series.overflowed or self._overflow_warned:
            return
        self._overflow_warned = True
        first = next(e for e in self.series.events if e["event"] == "float16_overflow")
        warnings.warn(f"budget-callback: the snapshot of step {first['step']} holds {first['values']:,} infinite "
                      "value(s): W has entries beyond float16's range (|w| > 65,504). Snapshots with them are counted "
                      "(manifest: snapshots_float16_overflow); pass snapshot_dtype='bfloat16' or 'float32' to keep "
                      "them finite", stacklevel=2)

    def _ran_past_forecast(self, step: int) -> None:
        """The run took more steps than the forecast counted (the Trainer's limits changed, or a count was
        wrong): say so once; the disk guard follows the steps as they come."""
        self._past_forecast = True
        text = (f"the run passed step {self.facts.final_step}, where the fit-start forecast expected it to end: "
                f"the forecast's totals are too low; the disk guard follows the real steps")
        warnings.warn(f"budget-callback: {text}", stacklevel=2)
        if self.series is not None:
            self.series.event({"step": step, "event": "past_forecast", "forecast_final_step": self.facts.final_step})

    def final_step(self, trainer: pl.Trainer) -> int:
        try:
            return max(self.schedule.last_step, R.final_step(trainer, self.schedule.stride))
        except ValueError:
            return self.facts.final_step

    def _guard(self, trainer: pl.Trainer, step: int) -> None:
        """Re-check free space; raise the interval, pause, or stop before the disk is full."""
        final = self.final_step(trainer)

        def decide():
            free = shutil.disk_usage(self.config.snapshot_dir).free
            on_disk = self.writer.on_disk_bytes
            return disk_guard.decide(self.series.schedule, final, free, self.config.disk_budget, on_disk,
                                     self.config.on_exceed, self._headroom(step, final))
        decision = decide_on_rank_zero(trainer.strategy, decide)
        self.next_check_step = decision.next_check_step
        if decision.action == "ok" or (decision.action == "warn" and self._warned):
            return
        if decision.action in ("raise_interval", "pause"):
            if self.series is not None:
                self.series.change_interval(decision.every)
            else:
                self.schedule.change_interval(decision.every)
        elif decision.action == "stop":
            self.stop_reason = (f"budget-callback: disk guard stopped the run at step {step}: "
                                f"{format_bytes(decision.available_bytes)} left for snapshots, "
                                f"{format_bytes(decision.needed_bytes)} needed for the rest")
            trainer.should_stop = True
        elif decision.action == "warn":
            self._warned = True
            warnings.warn(f"budget-callback: the remaining snapshots need {format_bytes(decision.needed_bytes)}, "
                          f"{format_bytes(decision.available_bytes)} is left", stacklevel=2)
        if self.series is not None:
            self.series.event(decision.to_event(step))
            self._log(trainer, logger_step(trainer))

    def _headroom(self, step: int, final: int) -> int:
        """Room the snapshots must leave: a stacked file rewritten bigger, and the copies W&B will still stage on
        this file system (counted where they land, :func:`~budget_callback.lightning.inputs.logging_spec`)."""
        st, spec = self.forecast.storage, self.forecast.inputs.logging
        staging = staging_bytes_after(spec, step, final, st["checkpoint_bytes"]) if st["wandb_staging_on_disk_bytes"] \
            else 0
        return st["rewrite_headroom_bytes"] + staging

    def _log(self, trainer: pl.Trainer, step: int) -> None:
        if self.series is None or not trainer.loggers:
            return
        on_disk = self.writer.on_disk_bytes if self.writer is not None else self.series.bytes_written
        metrics = self.tracker.metrics(trainer, self.series, self.capture, self.schedule.due_bytes(), on_disk,
                                       len(self.series.events))
        self.tracker.log(trainer, metrics, step)

    def _torn(self, step: int) -> None:
        self.series.record_dropped(step, "W was changed in place while it could be read for this snapshot (every copy is finished before the step goes on from now on)")

    def before_optimizer_step(self) -> None:
        """The copy of W taken at the last snapshot has read W before the optimizer changes it."""
        if self.capture is not None:
            with self._holding_copy_errors():
                self.capture.wait()

    @contextlib.contextmanager
    def _holding_copy_errors(self):
        """Several ranks: a copy that failed on rank 0 waits for the next batch end, where every rank stops."""
        try:
            yield
        except SnapshotWriteError as err:
            if self.writer is None or not self.writer.hold_errors:
                raise
            self._copy_error = self._copy_error or err

    # --- checkpoints ----------------------------------------------------------------------------------------
    def before_checkpoint(self) -> None:
        """Every snapshot up to the checkpoint's step is on disk before the checkpoint is (no gaps on resume).

        A checkpoint written by a signal handler that interrupted this callback's own batch end (SLURM's
        requeue signal) carries the series before that batch end; the queues may be held by the interrupted
        code, so its snapshots are made durable as the batch end finishes, milliseconds later."""
        if self._in_step:
            self._flush_after_step = True
            return
        if self.writer is not None and not self.writer.closed:
            self.capture.wait()
            self.writer.flush(final=False)
            self._check_files()

    def _check_files(self) -> None:
        """Files removed or changed by something else are no longer counted (said at once, not at a resume)."""
        gone = self.series.check_files()
        if gone:
            self.series.write_manifest()
            warnings.warn(f"budget-callback: {len(gone)} snapshot file(s) in {str(self.series.directory)!r} were "
                          f"removed or changed by something else: {', '.join(gone[:5])}; their snapshots are no "
                          "longer counted in bytes_written (the series goes on)", stacklevel=2)

    def state_dict(self) -> dict:
        if self.series is not None:
            self.before_checkpoint()  # Lightning asks for the state before on_save_checkpoint: flush first
            return self.series.state_dict()
        if self.restored is not None:  # not started yet (e.g. lr_find saving before training): pass it on
            return dict(self.restored)
        # not started yet: a resume from this checkpoint replaces what this run writes after it
        return {"version": 2, "run_id": None, "pending_run_id": self.run_id,
                "snapshot_dir": str(self.config.snapshot_dir)}

    # --- the end ------------------------------------------------------------------------------------------
    def finish(self, trainer: pl.Trainer, failed: BaseException | None = None) -> None:
        """The end of the fit: the series closed on rank 0, its figures shared with every rank (each rank on its
        own after an exception: another may be gone)."""
        if self.schedule is None or self._finished:
            return
        self._finished = True
        if failed is not None:
            if self.series is not None:
                self._close_series(failed)
        else:
            if self.notice is not None:
                self.notice.end()
            self.reported = decide_on_rank_zero(trainer.strategy, lambda: self._close_series(None))
        self.final_projected = self.schedule.due_bytes()
        if self.series is None:
            return
        step = logger_step(trainer)
        self._log(trainer, step)
        reason = " (run stopped by an exception)" if failed else (f" ({self.stop_reason})" if self.stop_reason else "")
        line = self.summary() + reason
        wandb = self.tracker.wandb
        if wandb:
            log_charts(wandb, self.tracker.points, step)
            log_events(wandb, self.series.events, step)
            log_summary_line(wandb, line)
        rank_zero_info(line)

    def _close_series(self, failed: BaseException | None) -> dict:
        """Rank 0: the last snapshots written, the files checked, the manifest final; the figures every rank reports."""
        try:
            self.capture.close()
            self.writer.close()
            if self.writer.error is not None:  # held for the other ranks: theirs too now (decide_on_rank_zero)
                raise SnapshotWriteError(f"the snapshot writer failed: {self.writer.error!r}") from self.writer.error
            self._check_files()
            self._warn_overflow()
        finally:
            self.series.summary = {"projected_bytes": self.schedule.due_bytes(),
                                   "forecast": self.forecast.to_dict() if self.forecast else None,
                                   "snapshot_ring": self.ring_used()}
            self.series.write_manifest("failed" if failed else "finished")
        return self.series.figures()

    def close(self) -> None:
        """Teardown: the writer stopped, the lock released, the model no longer referenced."""
        if self.notice is not None:
            self.notice.close()
        if self._at_exit is not None:
            self._at_exit.cancel()
            self._at_exit = None
        try:
            if self.capture is not None:
                self.capture.close()
            if self.writer is not None and not self.writer.closed:
                self.writer.close()
        finally:
            self.lock.release()
            self._remove_scratch()

    def _remove_scratch(self) -> None:
        """fast_dev_run: the scratch series goes with the fit (its figures stay readable on the callback)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def note_idle(self) -> None:
        """At teardown of a fit in which no batch ran (resumed from a checkpoint already at the Trainer's
        limit): nothing is touched; the figures are the series' as its checkpoint left it, from its files."""
        state = restored_series(self.restored)
        if self.series is not None or state is None or "layout" not in state:
            return
        layout = SnapshotLayout(**{k: v for k, v in state["layout"].items() if k != "names"})
        found = scan(self.config.snapshot_dir)
        if found.run_id not in (None, state.get("run_id")):
            return
        schedule = Schedule.from_state(layout, state["schedule"])
        self.idle = {"projected_bytes": schedule.due_bytes(), "bytes_written": sum(f.size for f in found.files),
                     "files": len(found.files), "last_step": schedule.last_step, "every": schedule.interval}

    def ring_used(self) -> dict | None:
        """The snapshot ring as this fit used it: the forecast's cap and its basis, the file images the capture
        made and what the measured pace allowed last (in the manifest's summary at the end of the fit)."""
        if self.capture is None or self.forecast is None:
            return None
        st, stats = self.forecast.storage, self.capture.stats
        return {"cap_buffers": st["host_buffer_images"], "cap_bytes": st["host_buffer_bytes"],
                "basis": st["host_buffer_basis"], "host_ram_available_bytes": st["host_ram_available_bytes"],
                "host_ram_share": st["host_ram_share"], "buffers": stats.ring_buffers,
                "bytes": self.capture.host_bytes, "allowed": stats.ring_allowed, "sized_by": stats.ring_sized_by}

    def projected_bytes(self) -> int:
        """The snapshot bytes due for the steps this fit ran to (the schedule's exact count, every interval
        change included); the fit-start forecast for the whole run is ``forecast.storage``."""
        if self.final_projected is not None:
            return self.final_projected
        if self.idle is not None:
            return self.idle["projected_bytes"]
        if self.schedule is None:
            return 0
        return self.schedule.projected_bytes(self.facts.final_step)

    def bytes_written(self) -> int:
        if self.series is not None:
            return self.series.bytes_written
        if self.reported is not None:  # another rank: rank 0's figures, shared at the end of the fit
            return self.reported["bytes_written"]
        return self.idle["bytes_written"] if self.idle is not None else 0

    def summary(self) -> str:
        """One line: projected vs actual snapshot bytes, the interval, and how the run compared with the
        fit-start forecast (:mod:`.summary`)."""
        if self.series is None and self.idle is not None:
            return idle_line(self.idle)
        if self.series is not None:
            figures, who = self.series.figures(), self.SMOKE if self.smoke else ""
            parts = [f"back-pressure {self.capture.stats.backpressure_seconds:.2f} s"] if self.capture else []
        elif self.reported is not None:
            figures, who, parts = self.reported, " (rank 0 writes the series; its figures)", []
        else:
            return NOT_STARTED
        forecast = (self.facts.final_step, self.forecast.storage["snapshot_bytes"]) \
            if self.forecast is not None and self.facts is not None else None
        return series_line(self.schedule, figures, who, parts, self.capture is not None, forecast)

    SMOKE = " (fast_dev_run: a scratch series, removed at the end; snapshot_dir untouched)"


# --- a fit that ran in another process (ddp_spawn) --------------------------------------------------------
def recorded_run(snapshot_dir: Path, launch_token: str) -> dict:
    """The manifest of the fit launched by the callback object holding ``launch_token``, else {}."""
    try:
        manifest = json.loads((snapshot_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if manifest.get("launch_token") == launch_token else {}


class RecordedForecast:
    """The forecast of a fit that ran in another process, as its manifest recorded it (``to_dict()`` schema)."""

    def __init__(self, d: dict) -> None:
        self._d = d
        for key in ("params", "memory", "flops", "time", "storage", "wandb", "notes", "decision",
                    "save_every_n_steps"):
            setattr(self, key, d.get(key))

    def to_dict(self) -> dict:
        return dict(self._d)

    @classmethod
    def of(cls, manifest: dict) -> RecordedForecast | None:
        return cls(manifest["forecast"]) if manifest.get("forecast") else None
