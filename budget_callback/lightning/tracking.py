"""Run tracking: step times, the ``budget/*`` metrics, and where and when they are logged.

Metrics go to every attached logger on Lightning's own logging step and cadence
(``log_every_n_steps``), so they land in the same row as the user's metrics
for that optimizer step. Lightning's ``LearningRateMonitor`` does the same:
the step is ``fit_loop.epoch_loop._batches_that_stepped``, the cadence
``_logger_connector.should_update_logs``.
"""

from __future__ import annotations

import statistics
from time import perf_counter

import lightning.pytorch as pl
import torch

from ..forecast.engine import Forecast
from ..forecast.wandb_usage import run_file_bytes_on_disk, wandb_usage
from .wandb_panels import run_file_bytes


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs the current batch's metrics at (``self.log`` rows)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def should_log(trainer: pl.Trainer) -> bool:
    """Lightning logs the user's step metrics after this batch (``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return False
    return bool(connector.should_update_logs)


class RunTracker:
    """Step times and the metrics a run logs; keeps the projected/actual points for the end-of-fit charts."""

    def __init__(self, forecast: Forecast, peak_flops: float | None, on_accelerator: bool, wandb: list) -> None:
        self.forecast = forecast
        self.peak_flops = peak_flops
        self.on_accelerator = on_accelerator
        self.wandb = wandb
        self.step_times: list[float] = []
        self._last: float | None = None
        self.points: dict[str, list] = {}

    def tick(self) -> None:
        """An optimizer step ended (``perf_counter`` between consecutive ones)."""
        now = perf_counter()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def metrics(self, trainer: pl.Trainer, series, capture, due_bytes: int, on_disk_bytes: int, events: int
                ) -> dict[str, float | int]:
        f = self.forecast
        schedule = series.schedule
        metrics: dict[str, float | int] = {
            "budget/disk_projected_bytes": due_bytes,
            "budget/disk_actual_bytes": on_disk_bytes,
            "budget/save_every_n_steps": schedule.interval,
            "budget/snapshots_dropped": series.dropped,
            "budget/snapshots_failed": series.lost,
            "budget/events": events,
        }
        if capture is not None:
            metrics["budget/writer_backpressure_seconds"] = round(capture.stats.backpressure_seconds, 6)
        if self.step_times:
            seconds = statistics.median(self.step_times[-max(1, trainer.log_every_n_steps):])
            metrics["budget/step_seconds"] = round(seconds, 6)
            if self.peak_flops and f is not None:
                world = trainer.world_size
                metrics["budget/mfu"] = round(f.flops["train_per_step"] / seconds / (self.peak_flops * world), 6)
                metrics["budget/mfu_projected"] = f.inputs.mfu
                metrics["budget/step_seconds_projected"] = round(
                    f.flops["train_per_step"] / (self.peak_flops * world * f.inputs.mfu), 6)
        if self.on_accelerator and torch.cuda.is_available() and f is not None:
            metrics["budget/memory_projected_bytes"] = f.memory["peak_bytes"]
            metrics["budget/memory_actual_bytes"] = int(torch.cuda.max_memory_allocated())
        return metrics

    def log(self, trainer: pl.Trainer, metrics: dict, step: int) -> None:
        self.record(step, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def record(self, step: int, metrics: dict) -> None:
        """Keep the projected and actual points for the end-of-fit charts (a repeated step is updated)."""
        if not self.wandb:
            return
        point = {"disk_projected": metrics["budget/disk_projected_bytes"],
                 "disk_actual": metrics["budget/disk_actual_bytes"]}
        if "budget/memory_actual_bytes" in metrics:
            point["memory_projected"] = metrics["budget/memory_projected_bytes"]
            point["memory_actual"] = metrics["budget/memory_actual_bytes"]
        actual = run_file_bytes(self.wandb[0])
        if actual is not None and self.forecast is not None:
            f = self.forecast
            # like with like: wandb-core writes whole blocks while the run lives, so both are what is on disk now
            point["wandb_projected"] = run_file_bytes_on_disk(wandb_usage(
                f.inputs.logging, min(step, f.inputs.steps), f.storage["checkpoint_bytes"])["run_file_bytes"])
            point["wandb_actual"] = actual
        p = self.points
        repeat = bool(p.get("step")) and p["step"][-1] == step
        if not repeat:
            p.setdefault("step", []).append(step)
        for key, value in point.items():
            values = p.setdefault(key, [])
            if repeat and len(values) == len(p["step"]):
                values[-1] = value
            else:
                values.append(value)
