"""W&B usage: points, rows and run-file bytes by hand from the measured per-row / per-point costs; the
BENCHMARKS.md 2c forecasts reproduced; checkpoints uploaded per log_model; parts that sum to the total."""

import pytest

from budget_callback.forecast.console import ConsoleSpec
from budget_callback.forecast.wandb_usage import (CALLBACK_METRICS, RUN_FILE_BYTES_PER_POINT, RUN_FILE_BYTES_PER_ROW,
                                                  RUN_FILE_FIXED_BYTES, SYSTEM_METRICS_BYTES_PER_SECOND, LoggingSpec,
                                                  wandb_usage)

PARTS = ("metrics_bytes", "console_bytes", "system_metrics_bytes", "artifact_bytes")


def test_measured_costs_are_the_documented_figures():
    # wandb_usage.py / BENCHMARKS.md 2c: ~303 B per row, ~84 B per scalar, ~15.5 kB fixed;
    # BENCHMARKS.md 2e: one ~455 B `stats` record every ~15 s
    assert (RUN_FILE_FIXED_BYTES, RUN_FILE_BYTES_PER_ROW, RUN_FILE_BYTES_PER_POINT) == (15_500, 303, 84)
    assert SYSTEM_METRICS_BYTES_PER_SECOND == 455 / 15
    assert CALLBACK_METRICS == 8


@pytest.mark.parametrize("steps, log_every, rows, points, metrics_bytes", [
    # BENCHMARKS.md 2c, "forecast B" column (1 train metric + 8 budget/* + epoch = 10 points per row)
    (100, 1, 100, 1000, 129_800),
    (500, 10, 50, 500, 72_650),
    (1000, 50, 20, 200, 38_360),
    (1000, 5, 200, 2000, 244_100),
    (49, 50, 0, 0, 15_500),  # fewer steps than the cadence: no row, the fixed part only
])
def test_the_benchmark_forecasts_are_reproduced(steps, log_every, rows, points, metrics_bytes):
    u = wandb_usage(LoggingSpec(log_every_n_steps=log_every, console=None), steps, checkpoint_bytes=0)
    assert (u["rows"], u["metric_points"], u["metrics_bytes"]) == (rows, points, metrics_bytes)
    assert u["console_bytes"] == u["system_metrics_bytes"] == u["artifact_bytes"] == 0
    assert u["total_bytes"] == u["run_file_bytes"] == metrics_bytes


@pytest.mark.parametrize("spec, steps, rows, points", [
    # train rows: steps // log_every, each train_metrics + budget_metrics + epoch; eval rows: eval_metrics + epoch
    (dict(log_every_n_steps=10, train_metrics=3, eval_every_n_steps=100, eval_metrics=2), 1000, 100 + 10,
     100 * (3 + 8 + 1) + 10 * (2 + 1)),
    (dict(log_every_n_steps=7, train_metrics=0, budget_metrics=0), 50, 7, 7),
    (dict(log_every_n_steps=1, budget_metrics=13, eval_every_n_steps=3, eval_metrics=0), 10, 10 + 3, 10 * 15 + 3),
])
def test_rows_and_points_by_hand(spec, steps, rows, points):
    u = wandb_usage(LoggingSpec(**spec, console=None), steps, checkpoint_bytes=0)
    assert (u["rows"], u["metric_points"]) == (rows, points)
    per_rows, per_points = rows * RUN_FILE_BYTES_PER_ROW, points * RUN_FILE_BYTES_PER_POINT
    assert u["metrics_bytes"] == RUN_FILE_FIXED_BYTES + per_rows + per_points


@pytest.mark.parametrize("log_model, every, keep, steps, uploads", [
    ("none", 100, 3, 1000, 0),
    ("last", 100, 3, 1000, 3),  # the kept checkpoints: save_top_k of them at most
    ("last", 400, 3, 1000, 2),  # ... and no more than were written
    ("all", 100, 3, 1000, 10),  # every checkpoint written
    ("all", None, 1, 1000, 0),  # no checkpoints at all
])
def test_checkpoints_uploaded_per_log_model_and_staged_locally(log_model, every, keep, steps, uploads):
    spec = LoggingSpec(checkpoint_every_n_steps=every, keep_checkpoints=keep, log_model=log_model, console=None)
    u = wandb_usage(spec, steps, checkpoint_bytes=1_000_003)
    assert u["artifact_bytes"] == u["artifact_staging_bytes"] == uploads * 1_000_003
    assert u["total_bytes"] == u["run_file_bytes"] + uploads * 1_000_003


@pytest.mark.parametrize("every, keep, steps, written, kept", [
    (None, 5, 1000, 0, 0), (100, 1, 1000, 10, 1), (100, 20, 1000, 10, 10), (300, 2, 1000, 3, 2), (1000, 1, 999, 0, 0),
])
def test_checkpoints_written_and_kept(every, keep, steps, written, kept):
    spec = LoggingSpec(checkpoint_every_n_steps=every, keep_checkpoints=keep)
    assert (spec.checkpoints_written(steps), spec.checkpoints_kept(steps)) == (written, kept)


@pytest.mark.parametrize("seconds, measured", [(207, 6_356), (291, 9_151), (405, 12_454)])
def test_system_metrics_follow_the_run_time(seconds, measured):
    """BENCHMARKS.md 2e: offline runs of 207 / 291 / 405 s wrote 6,356 / 9,151 / 12,454 B of system metrics."""
    u = wandb_usage(LoggingSpec(console=None), 1000, 0, run_seconds=seconds)
    assert u["system_metrics_bytes"] == int(seconds * 455 / 15)
    assert abs(u["system_metrics_bytes"] - measured) / measured < 0.05
    assert wandb_usage(LoggingSpec(console=None), 1000, 0)["system_metrics_bytes"] == 0  # run time unknown


@pytest.mark.parametrize("console", [ConsoleSpec(), ConsoleSpec(console="off"), ConsoleSpec(refresh_rate=10), None])
def test_console_output_is_counted_as_the_console_model_says(console):
    u = wandb_usage(LoggingSpec(console=console), 1000, 0)
    assert u["console_bytes"] == (console.output_bytes(1000)["total"] if console is not None else 0)
    if console is not None and console.console != "off":
        assert u["console_bytes"] > 0


@pytest.mark.parametrize("spec, steps, ckpt, seconds", [
    (LoggingSpec(), 1000, 0, None),
    (LoggingSpec(log_every_n_steps=1, checkpoint_every_n_steps=50, log_model="all"), 500, 12_345_678, 3600.5),
    (LoggingSpec(eval_every_n_steps=10, log_model="last", checkpoint_every_n_steps=10, keep_checkpoints=2),
     77, 99, 1.0),
])
def test_parts_are_integers_that_sum_to_the_total(spec, steps, ckpt, seconds):
    u = wandb_usage(spec, steps, ckpt, seconds)
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in u.values())
    assert u["run_file_bytes"] == u["metrics_bytes"] + u["console_bytes"] + u["system_metrics_bytes"]
    assert u["total_bytes"] == sum(u[k] for k in PARTS)


@pytest.mark.parametrize("field, value, message", [
    ("log_every_n_steps", 0, "`log_every_n_steps` must be a positive integer, got 0"),
    ("eval_every_n_steps", -5, "`eval_every_n_steps` must be a positive integer or None, got -5"),
    ("checkpoint_every_n_steps", 2.5, "`checkpoint_every_n_steps` must be a positive integer or None, got 2.5"),
    ("train_metrics", -1, "`train_metrics` must be a non-negative integer, got -1"),
    ("budget_metrics", "8", "`budget_metrics` must be a non-negative integer, got '8'"),
    ("keep_checkpoints", 1.0, "`keep_checkpoints` must be a non-negative integer, got 1.0"),
    ("log_model", True, "`log_model` must be one of none, last, all, got True"),
])
def test_bad_logging_settings_name_the_argument(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoggingSpec(**{field: value})


def test_to_dict_is_plain():
    d = LoggingSpec(console=ConsoleSpec(refresh_rate=5)).to_dict()
    assert d["console"] == ConsoleSpec(refresh_rate=5).to_dict() and d["log_every_n_steps"] == 50
    assert LoggingSpec(console=None).to_dict()["console"] is None
