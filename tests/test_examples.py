"""The examples as a new user runs them (real subprocesses, W&B offline)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_train_tiny_gpt_then_token_dynamics(tmp_path):
    out = tmp_path / "run"
    proc = _run([str(ROOT / "examples" / "train_tiny_gpt.py"), "--steps", "12", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "budget-callback forecast" in text and "difference +0 B" in text
    last = proc.stdout.rstrip("\n").splitlines()[-1]  # the summary is the last line printed
    assert re.fullmatch(r"Projected vs actual: 12 snapshots every 1 step\(s\): projected ([\d,]+) B, actual \1 B, "
                        r"difference \+0 B", last), last
    forecast, actual = (int(x.replace(",", "")) for x in
                        re.search(r"W&B run file: forecast ([\d,]+) B .* actual ([\d,]+) B", text).groups())
    assert abs(forecast - actual) / actual < 0.20  # the progress bar W&B captures is in the forecast
    assert len([p for p in os.listdir(out / "snapshots") if p.endswith(".safetensors")]) == 12
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    proc = _run([str(ROOT / "examples" / "token_dynamics.py"), "--snapshots", str(out / "snapshots")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cos(first, last)" in proc.stdout and "<unused_" in proc.stdout


def test_train_tiny_gpt_downsamples_to_fit_a_disk_budget(tmp_path):
    out = tmp_path / "run"
    proc = _run([str(ROOT / "examples" / "train_tiny_gpt.py"), "--steps", "12", "--disk-budget", "5MB",
                 "--no-wandb", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in os.listdir(out / "snapshots") if p.endswith(".safetensors")]
    assert sum(os.path.getsize(out / "snapshots" / f) for f in files) <= 5_000_000
    assert 0 < len(files) < 12


def test_token_dynamics_without_snapshots_exits_2(tmp_path):
    proc = _run([str(ROOT / "examples" / "token_dynamics.py"), "--snapshots", str(tmp_path / "none")], tmp_path)
    assert proc.returncode == 2 and "--snapshots" in proc.stderr
