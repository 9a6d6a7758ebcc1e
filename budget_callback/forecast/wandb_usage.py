"""Weights & Biases usage: metric points, local run-file bytes, artifact bytes.

The per-point and per-row costs of the local ``run-*.wandb`` file were
measured on offline runs of wandb 0.31 (see ``benchmarks/wandb_run_file.py``
and BENCHMARKS.md); the storage budget is the user's figure, we ship none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..validate import one_of, positive_int
from .console import ConsoleSpec

# Measured on offline runs (wandb 0.31.0, WandbLogger.log_metrics, 15-character keys, full-precision
# floats): each logged row costs ~303 B (``_step``, ``_runtime``, ``_timestamp``,
# ``trainer/global_step``) and each scalar ~84 B, as every point is written twice (history row and
# summary update). An empty run file is ~1.5 kB; with BudgetCallback attached the run also holds the
# forecast in its config, the forecast table and the end-of-fit charts: ~15.5 kB fixed in all
# (least-squares fit of real runs, ``benchmarks/wandb_run_file.py``, BENCHMARKS.md section 2c).
RUN_FILE_FIXED_BYTES = 15_500
RUN_FILE_BYTES_PER_ROW = 303
RUN_FILE_BYTES_PER_POINT = 84
# Scalars BudgetCallback logs per row: disk projected/actual, interval, back-pressure, dropped, failed,
# events, step time; on a GPU also memory projected/actual and MFU, MFU projected, step time projected.
# System metrics W&B samples while a run lives: one ~455 B `stats` record every ~15 s (offline runs of
# 207 / 291 / 405 s wrote 6,356 / 9,151 / 12,454 B; BENCHMARKS.md 2e). Counted when the run time is forecast.
SYSTEM_METRICS_BYTES_PER_SECOND = 455 / 15
CALLBACK_METRICS = 8
CALLBACK_METRICS_ACCELERATOR = 13
LOG_MODEL_CHOICES = ("none", "last", "all")


@dataclass(frozen=True)
class LoggingSpec:
    """The run's logging cadence."""

    log_every_n_steps: int = 50  # Lightning's default
    train_metrics: int = 1  # scalars logged per train row (loss, lr, ...)
    eval_every_n_steps: int | None = None
    eval_metrics: int = 1
    budget_metrics: int = CALLBACK_METRICS  # the callback's own budget/... scalars per row
    checkpoint_every_n_steps: int | None = None  # None: no checkpoints
    keep_checkpoints: int = 1  # ModelCheckpoint(save_top_k=...) files on disk at once
    log_model: str = "none"  # WandbLogger(log_model=...): "none" (False), "last" (True), "all"
    # whether W&B's local staging copies of logged checkpoints (under WANDB_DATA_DIR, and the cache they move to
    # after an upload) land on the snapshots' file system; None: where the checkpoints land
    staging_shares_disk: bool | None = None
    console: ConsoleSpec | None = ConsoleSpec()  # what the run prints (W&B captures it); None: not captured

    def __post_init__(self) -> None:
        positive_int("log_every_n_steps", self.log_every_n_steps)
        for field in ("eval_every_n_steps", "checkpoint_every_n_steps"):
            positive_int(field, getattr(self, field), optional=True)
        for field in ("train_metrics", "eval_metrics", "budget_metrics", "keep_checkpoints"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{field}` must be a non-negative integer, got {value!r}")
        one_of("log_model", self.log_model, LOG_MODEL_CHOICES)

    def checkpoints_written(self, steps: int) -> int:
        return steps // self.checkpoint_every_n_steps if self.checkpoint_every_n_steps else 0

    def checkpoints_kept(self, steps: int) -> int:
        return min(self.keep_checkpoints, self.checkpoints_written(steps))

    def to_dict(self) -> dict:
        return {**asdict(self), "console": self.console.to_dict() if self.console is not None else None}


def staging_bytes_after(spec: LoggingSpec, step: int, steps: int, checkpoint_bytes: int) -> int:
    """Bytes W&B still copies into its staging area after optimizer step ``step`` of a run of ``steps``:
    ``log_model="all"`` stages each checkpoint as it is saved, ``"last"`` the kept ones at the end."""
    if spec.log_model == "all":
        return (spec.checkpoints_written(steps) - spec.checkpoints_written(step)) * checkpoint_bytes
    if spec.log_model == "last":
        return spec.checkpoints_kept(steps) * checkpoint_bytes if step < steps else 0
    return 0


# wandb-core writes ``run-*.wandb`` as a LevelDB-style log: a 7-byte header, then whole 32 KiB blocks, each written
# when it fills; the last, partial block only when the run finishes. While the run lives, its size on disk is a
# multiple of the block (or the header alone).
RUN_FILE_BLOCK_BYTES = 32_768
RUN_FILE_HEADER_BYTES = 7


def run_file_bytes_on_disk(run_file_bytes: int) -> int:
    """The size ``run-*.wandb`` has on disk while the run lives, once ``run_file_bytes`` have been logged to it."""
    blocks = run_file_bytes // RUN_FILE_BLOCK_BYTES
    return blocks * RUN_FILE_BLOCK_BYTES if blocks else RUN_FILE_HEADER_BYTES


def wandb_usage(spec: LoggingSpec, steps: int, checkpoint_bytes: int, run_seconds: float | None = None
                ) -> dict[str, int]:
    """Metric points and bytes a run sends to W&B (itemised; bytes parts sum to ``total_bytes``).

    Every train row also carries ``epoch`` (Lightning adds it), counted as a
    point; ``trainer/global_step`` is part of the per-row cost. The run file
    also holds the console output W&B captures (the progress bar is most of it:
    :mod:`.console`) and, when the run time is known, its system metrics.
    """
    train_rows = steps // spec.log_every_n_steps
    eval_rows = steps // spec.eval_every_n_steps if spec.eval_every_n_steps else 0
    points = train_rows * (spec.train_metrics + spec.budget_metrics + 1) + eval_rows * (spec.eval_metrics + 1)
    rows = train_rows + eval_rows
    console = spec.console.output_bytes(steps)["total"] if spec.console is not None else 0
    system = int(run_seconds * SYSTEM_METRICS_BYTES_PER_SECOND) if run_seconds else 0
    metrics = RUN_FILE_FIXED_BYTES + rows * RUN_FILE_BYTES_PER_ROW + points * RUN_FILE_BYTES_PER_POINT
    run_file = metrics + console + system
    uploads = {"none": 0, "last": spec.checkpoints_kept(steps), "all": spec.checkpoints_written(steps)}[spec.log_model]
    artifact = uploads * checkpoint_bytes
    return {
        "metric_points": points,
        "rows": rows,
        "metrics_bytes": metrics,
        "console_bytes": console,
        "system_metrics_bytes": system,
        "run_file_bytes": run_file,
        "artifact_bytes": artifact,
        "artifact_staging_bytes": artifact,  # W&B stages a local copy of every logged checkpoint
        "total_bytes": run_file + artifact,
    }
