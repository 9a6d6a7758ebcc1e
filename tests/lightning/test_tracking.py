"""Run tracking: the budget/* metrics in the row of the user's metrics, step times on a patched clock,
accelerator memory figures."""

import csv
import os
from unittest import mock

import torch
from lightning.pytorch.loggers import CSVLogger

import budget_callback.lightning.tracking as tracking
from budget_callback import BudgetCallback
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.schedule import series_bytes
from helpers import TinyLM, token_loader, trainer

LAYOUT = SnapshotLayout(50, 8, "bfloat16")


def test_metrics_land_in_the_row_of_the_users_metrics(tmp_path):
    cb = BudgetCallback(tmp_path / "s")
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=6, logger=logger, log_every_n_steps=2).fit(TinyLM(), token_loader())
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    user = {r["step"] for r in rows if r.get("train/loss")}
    ours = [r for r in rows if r.get("budget/disk_actual_bytes")]
    assert user == {"1", "3", "5"}  # Lightning logs optimizer step s at step s - 1
    assert {r["step"] for r in ours} >= user
    last = ours[-1]
    assert int(last["budget/disk_actual_bytes"]) == cb.bytes_written
    assert int(last["budget/disk_projected_bytes"]) == cb.projected_bytes
    assert int(last["budget/save_every_n_steps"]) == 1
    # the row of optimizer step 4 (logger step 3) holds the bytes due by step 4
    row4 = next(r for r in ours if r["step"] == "3")
    assert int(row4["budget/disk_projected_bytes"]) == series_bytes(LAYOUT, 4, 1)


def test_step_seconds_with_a_patched_clock(tmp_path, monkeypatch):
    """Measured time per optimizer step is asserted exactly: the clock advances 0.25 s per step."""
    ticks = iter(range(1000))
    monkeypatch.setattr(tracking, "perf_counter", lambda: next(ticks) * 0.25)
    cb = BudgetCallback(tmp_path / "s")
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=4, logger=logger, log_every_n_steps=2).fit(TinyLM(), token_loader())
    rows = [r for r in csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))) if r.get("budget/step_seconds")]
    assert {float(r["budget/step_seconds"]) for r in rows} == {0.25}


def test_accelerator_memory_metrics(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's peak-memory probe is mocked (the one thing that cannot exist on this machine)."""
    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(), token_loader())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123_456)
    session = cb._fit
    session.tracker.on_accelerator = True
    fake_trainer = mock.Mock(log_every_n_steps=1, world_size=1)
    metrics = session.tracker.metrics(fake_trainer, session.series, session.capture, 0, 0, 0)
    assert metrics["budget/memory_projected_bytes"] == cb.forecast.memory["peak_bytes"]
    assert metrics["budget/memory_actual_bytes"] == 123_456
