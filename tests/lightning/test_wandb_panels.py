"""Real W&B in offline mode: run the callback, read the run file back."""

import glob
import json
import os

import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from budget_callback import BudgetCallback
from helpers import TinyLM, token_loader, trainer
from wandb_records import config_dict, history_rows, load_table, media_in_history, read_complete, summary_dict


def _run(tmp_path, **kwargs):
    logger = WandbLogger(project="budget-test", save_dir=str(tmp_path), offline=True)
    cb = BudgetCallback(tmp_path / "snaps", **kwargs)
    trainer(tmp_path, [cb], max_steps=6, logger=logger, log_every_n_steps=2).fit(TinyLM(), token_loader())
    run_dir = os.path.dirname(logger.experiment.dir)
    wandb.finish()
    return cb, run_dir, read_complete(run_dir)


def test_series_config_table_and_chart_in_run_file(tmp_path):
    cb, run_dir, recs = _run(tmp_path)
    rows = history_rows(recs)
    disk = [r for r in rows if "budget/disk_actual_bytes" in r]
    # the budget series share the rows of the user's metrics (Lightning logs optimizer step s at step s - 1)
    user = [r["trainer/global_step"] for r in rows if "train/loss" in r]
    assert user == [1, 3, 5] and [r["trainer/global_step"] for r in disk][:3] == user
    assert disk[-1]["budget/disk_actual_bytes"] == cb.bytes_written == cb.projected_bytes
    assert disk[-1]["budget/disk_projected_bytes"] == cb.projected_bytes
    assert disk[-1]["budget/save_every_n_steps"] == 1

    config = config_dict(recs)
    forecast = config["budget_forecast"]
    assert forecast["storage"]["snapshot_bytes"] == cb.projected_bytes
    assert forecast["params"]["total"] == cb.forecast.params["total"]
    assert "disk_chart" in json.dumps(config["_wandb"]["visualize"])

    media = media_in_history(rows)
    table = load_table(run_dir, media["budget/forecast_table"])
    assert table["columns"] == ["section", "item", "value", "unit"]
    assert ["storage", "snapshot_bytes", cb.projected_bytes, "bytes"] in table["data"]
    chart = load_table(run_dir, media["budget/disk_chart_table"])
    series = {}
    for step, key, value in chart["data"]:
        series.setdefault(key, {})[step] = value
    assert series["projected"][6] == series["actual"][6] == cb.projected_bytes  # the end-of-fit point
    assert set(series["projected"]) == {1, 3, 5, 6}
    assert "difference +0 B" in summary_dict(recs)["budget/summary"]


def test_wandb_usage_chart_compares_run_file(tmp_path):
    cb, run_dir, recs = _run(tmp_path)
    media = media_in_history(history_rows(recs))
    chart = load_table(run_dir, media["budget/wandb_chart_table"])
    actual = [v for _, k, v in chart["data"] if k == "actual"]
    # the run file's real size at each point: it only grows, and is written by the end (wandb 0.17's Python
    # writer may not have flushed anything at the first point: 0 there is the truth, seen on the oldest pins)
    assert actual and actual == sorted(actual) and actual[-1] > 0
    assert os.path.getsize(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]) >= actual[-1]


def test_events_are_logged_values(tmp_path):
    (tmp_path / "snaps").mkdir()
    (tmp_path / "snaps" / ".step_000000001.safetensors.tmp-1").write_bytes(b"stale")
    cb, run_dir, recs = _run(tmp_path)
    rows = history_rows(recs)
    assert max(r.get("budget/events", 0) for r in rows) >= 1
    events = load_table(run_dir, media_in_history(rows)["budget/events_table"])
    assert events["data"][0][1] == "cleaned_temporaries"


def test_without_wandb_the_callback_behaves_the_same(tmp_path):
    cb = BudgetCallback(tmp_path / "a")
    trainer(tmp_path, [cb], max_steps=4, logger=CSVLogger(tmp_path)).fit(TinyLM(), token_loader())
    nolog = BudgetCallback(tmp_path / "b")
    trainer(tmp_path, [nolog], max_steps=4, logger=False).fit(TinyLM(), token_loader())
    assert cb.bytes_written == nolog.bytes_written == cb.projected_bytes
    assert cb._fit.tracker.wandb == [] and nolog._fit.tracker.wandb == []


def test_forecast_counts_every_scalar_the_callback_logs(tmp_path):
    from budget_callback.forecast.wandb_usage import CALLBACK_METRICS

    cb, run_dir, recs = _run(tmp_path)
    # tables and charts appear as flattened "key.field" items (wandb < 0.18: one dict item); scalars are neither
    scalars = {k for r in history_rows(recs) for k, v in r.items()
               if k.startswith("budget/") and "." not in k and not isinstance(v, dict)}
    assert len(scalars) == CALLBACK_METRICS == cb.forecast.inputs.logging.budget_metrics, sorted(scalars)
    size = os.path.getsize(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0])
    assert abs(cb.forecast.wandb["run_file_bytes"] - size) / size < 0.5  # tiny run: fixed part dominates


@pytest.mark.skipif(tuple(int(x) for x in wandb.__version__.split(".")[:2]) < (0, 18),
                    reason="wandb-core (whole 32 KiB blocks while the run lives) is wandb's writer from 0.18; "
                           f"wandb {wandb.__version__}'s Python writer flushes partial blocks")
def test_wandb_chart_compares_like_with_like(tmp_path):
    """wandb-core writes its run file in whole 32 KiB blocks while the run lives. Before: the chart set the
    forecast of the finished file against the blocks written so far (13 KB "actual" against a 27 KB forecast)."""
    block, header = 32_768, 7
    logger = WandbLogger(project="budget-test", save_dir=str(tmp_path), offline=True)
    cb = BudgetCallback(tmp_path / "snaps", verbose=False)
    trainer(tmp_path, [cb], max_steps=40, logger=logger, log_every_n_steps=1).fit(TinyLM(), token_loader(n=160))
    run_dir = os.path.dirname(logger.experiment.dir)
    wandb.finish()
    recs = read_complete(run_dir)
    chart = load_table(run_dir, media_in_history(history_rows(recs))["budget/wandb_chart_table"])
    series = {}
    for step, key, value in chart["data"]:
        series.setdefault(key, {})[step] = value
    for key in ("projected", "actual"):
        assert all(v == header or v % block == 0 for v in series[key].values()), key
    assert max(series["actual"].values()) >= block  # the run crossed blocks while it lived
    off = [abs(series["projected"][s] - series["actual"][s]) for s in series["actual"]]
    assert max(off) <= block and sum(o == 0 for o in off) >= len(off) // 2
