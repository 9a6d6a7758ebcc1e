"""BudgetCallback: thin Lightning hooks over one :class:`~.session.FitSession` per fit."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .config import BudgetConfig
from .distributed import raise_from_spawned_rank
from .session import FitSession, RecordedForecast, recorded_run


class BudgetCallback(Callback):
    """Forecast memory, disk and W&B usage; guard the budgets; stream W (and E) to safetensors.

    Args:
        snapshot_dir: where the series goes; resolved to an absolute path here, once.
        save_every_n_steps: requested interval in optimizer steps (the guard may raise it).
        snapshot_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        snapshots_per_file: ``K > 1`` stacks K snapshots per file as ``(K, V, D)``.
        unembedding: None (auto-detect), a parameter name, or ``callable(module) -> Tensor (V, D)``.
        include_embedding: also record the input embedding E (stored once when tied to W).
        disk_budget / memory_budget / wandb_budget: bytes (int) or ``"12GB"`` / ``"12GiB"``; disk None: the free
            space of snapshot_dir's file system; memory None: the accelerator's memory (host RAM on the CPU).
        on_exceed: ``"downsample"`` (raise the interval), ``"abort"`` or ``"warn"``.
        queue_depth: snapshots waiting for the writer at most (bounds host RAM; the ring of ``queue_depth + 2``
            file images also stays within 25% of the host RAM available at fit start, and grows only as the
            measured pace of the disk and the steps asks).
        when_behind: ``"wait"`` (back-pressure, reported) or ``"drop"`` (counted) when the disk is slow.
        overwrite: replace another run's snapshots in snapshot_dir.
        fsync: fsync files before they become visible.
        verbose: print the forecast report when training starts.

    Each fit starts fresh. A directory holding snapshots is continued only by the run that wrote them,
    resumed from its checkpoint (``trainer.fit(..., ckpt_path=...)``); anything else is refused before
    anything in it is touched, unless ``overwrite=True``. The directory is locked for the whole fit. A
    checkpoint taken at any moment (any hook, an exception, a signal handler) resumes to the files of a run
    never interrupted; a resume that asks for another ``save_every_n_steps`` gets it from the resume on.
    Under ``fast_dev_run`` the series goes to a scratch directory, removed at the end.

    Logs to every logger, in the row of the user's metrics for that step: ``budget/disk_projected_bytes``,
    ``budget/disk_actual_bytes``, ``budget/save_every_n_steps``, ``budget/snapshots_dropped``,
    ``budget/snapshots_failed``, ``budget/events``, ``budget/writer_backpressure_seconds``,
    ``budget/step_seconds``; on a known GPU ``budget/mfu``, ``budget/mfu_projected``,
    ``budget/step_seconds_projected``; on CUDA ``budget/memory_projected_bytes``, ``budget/memory_actual_bytes``.

    Raises:
        ValueError: a bad argument (named), a directory that cannot be used, a resume that does not match.
        BudgetExceededError: a budget cannot be met under the policy (before the first step, nothing written).
        SnapshotDirInUseError: another fit holds snapshot_dir (the message names it).
        SnapshotWriteError: the writer failed (raised at the next step, with the cause; under several
            processes on every rank at the same batch end).
        OSError: ENOSPC with the path and the bytes needed, when a resume cannot cut its files back.

    Warns (once each, and an event): the recorded W was one of several candidates (naming the others);
    float16 snapshots hold infinities; snapshot files were removed or changed by something else.
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
        self.config = BudgetConfig.from_arguments(
            snapshot_dir, save_every_n_steps, snapshot_dtype, snapshots_per_file, unembedding, include_embedding,
            disk_budget, memory_budget, wandb_budget, on_exceed, queue_depth, when_behind, overwrite, fsync, verbose)
        self._fit: FitSession | None = None
        self._pending_state: dict | None = None
        self._launch_token = uuid.uuid4().hex  # ties a spawned fit's manifest to this object (ddp_spawn)

    # --- read-outs (after fit; under ddp_spawn, rank 0's figures from its manifest) ---------------
    @property
    def snapshot_dir(self):
        return self.config.snapshot_dir

    @property
    def forecast(self):
        return self._fit.forecast if self._fit else RecordedForecast.of(self._recorded())

    @property
    def save_every_n_steps(self) -> int:
        if self._fit and self._fit.schedule is not None:
            return self._fit.schedule.interval
        return self._recorded().get("save_every_n_steps", self.config.save_every_n_steps)

    @property
    def projected_bytes(self) -> int:
        return self._fit.projected_bytes() if self._fit else self._recorded().get("projected_bytes", 0)

    @property
    def bytes_written(self) -> int:
        return self._fit.bytes_written() if self._fit else self._recorded().get("bytes_written", 0)

    @property
    def events(self) -> list[dict]:
        if self._fit:
            return list(self._fit.series.events) if self._fit.series else []
        return self._recorded().get("events", [])

    @property
    def series(self):
        """The snapshot series of the last fit on this process (None before training started)."""
        return self._fit.series if self._fit else None

    @property
    def stop_reason(self) -> str | None:
        return self._fit.stop_reason if self._fit else None

    def summary(self) -> str:
        return self._fit.summary() if self._fit else "budget-callback summary: no fit has run in this process"

    def _recorded(self) -> dict:
        return recorded_run(self.config.snapshot_dir, self._launch_token)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(snapshot_dir=str(self.config.snapshot_dir))

    # --- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit = FitSession(self.config, self._launch_token)
        self._fit.restored, self._pending_state = self._pending_state, None
        self._fit.setup(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._fit is not None:
            states = checkpoint.get("callbacks", {}) or {}
            self._fit.checkpoint_dirs = [str(v.get("snapshot_dir", k)) if isinstance(v, dict) else k
                                         for k, v in states.items() if str(k).startswith("BudgetCallback")]
            if self.state_key not in states:  # written with another spelling of this directory (a symbolic link)
                same = [v for k, v in states.items() if str(k).startswith("BudgetCallback") and isinstance(v, dict)
                        and v.get("snapshot_dir") and os.path.realpath(v["snapshot_dir"]) == str(self.snapshot_dir)]
                if len(same) == 1:
                    self._fit.restored = dict(same[0])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fit is not None:
            self._fit.restored = dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._fit is not None and self._fit.schedule is None:  # the first batch: start before its step
            self._fit.start(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._fit is not None and self._fit.schedule is not None:
            self._fit.on_step(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._fit is not None:
            self._fit.before_optimizer_step()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._fit is not None:
            self._fit.before_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return self._fit.state_dict() if self._fit else {"version": 2, "run_id": None}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit.finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._fit is None:
            raise_from_spawned_rank(exception)  # the main process of ddp_spawn: our error, as our type
            return
        try:
            self._fit.finish(trainer, failed=exception)
        except Exception as err:  # noqa: BLE001 - the original exception matters more
            warnings.warn(f"budget-callback: could not flush snapshots after {exception!r}: {err!r}", stacklevel=2)
        finally:
            self._fit.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._fit is not None:
            try:
                if trainer.is_global_zero:
                    self._fit.note_idle()
            finally:
                self._fit.close()
