"""Several processes for real (gloo on the CPU): one series, decisions and failures reach every rank, no hang.

Each case runs a script in a subprocess (Lightning launches the ranks); every rank writes what it saw to a
JSON file. The subprocess timeout only bounds a hang, it decides nothing."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch import strategies

from budget_callback import SnapshotReader
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.schedule import series_bytes

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, json, os, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import lightning as L, torch
    from budget_callback import BudgetCallback
    from helpers import TinyLM, token_loader
    {prelude}
    cb = BudgetCallback({snaps!r}, **{kwargs!r})
    t = L.Trainer(max_steps={max_steps}, accelerator="cpu", devices=2, strategy={strategy}, logger=False,
                  callbacks=[cb] + extra_callbacks(), enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir={root!r})
    try:
        t.fit(make_module(), token_loader(n=64))
        outcome, message = "ok", ""
    except Exception as err:
        outcome, message = type(err).__name__, str(err)
    rank = os.environ.get("LOCAL_RANK", "main" if {spawn!r} else "0")
    with open(os.path.join({root!r}, f"rank{{rank}}.json"), "w") as fh:
        json.dump({{"outcome": outcome, "message": message, "every": cb.save_every_n_steps,
                   "bytes_written": cb.bytes_written, "projected_bytes": cb.projected_bytes, "summary": cb.summary(),
                   "decision": cb.forecast.decision if cb.forecast else None, **report(t, cb)}}, fh)
    {epilogue}
""")

DEFAULT_PRELUDE = """
def make_module():
    return TinyLM()
def extra_callbacks():
    return []
def report(trainer, cb):
    return {}
"""


def _run(tmp_path, kwargs, strategy='"ddp"', prelude=DEFAULT_PRELUDE, spawn=False, check=False, max_steps=6,
         epilogue=""):
    """Run the script; ``check``: its exit status must be 0 before any rank's file is read (a rank that died
    leaves no file, or an empty one). A file that is not JSON fails the test with the exit status and stderr."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), snaps=str(tmp_path / "s"), kwargs=kwargs,
                                    strategy=strategy, root=str(tmp_path), prelude=prelude, spawn=spawn,
                                    max_steps=max_steps, epilogue=epilogue))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-3000:]}"
    results = {}
    for path in tmp_path.glob("rank*.json"):
        try:
            results[path.stem[4:]] = json.loads(path.read_text())
        except ValueError:
            pytest.fail(f"{path.name} is not JSON (the rank died writing it); exit status {proc.returncode}: "
                        f"{proc.stderr[-3000:]}")
    return proc, results


def test_ddp_two_processes_write_one_series(tmp_path, record):
    proc, results = _run(tmp_path, {}, check=True)
    assert [results[r]["outcome"] for r in ("0", "1")] == ["ok", "ok"]
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3, 4, 5, 6]
    assert results["0"]["bytes_written"] == results["0"]["projected_bytes"] == series_bytes(
        SnapshotLayout(50, 8, "bfloat16"), 6, 1)
    # rank 1 reports the series too (before: 0 B, 0 B and "the series did not start")
    assert results["1"]["bytes_written"] == results["1"]["projected_bytes"] == results["0"]["bytes_written"]
    assert "rank 0 writes the series" in results["1"]["summary"] and "difference +0 B" in results["1"]["summary"]
    record(ranks=2, files=6, steps=6, rank1=dict(bytes_written=results["1"]["bytes_written"],
                                                 projected=results["1"]["projected_bytes"]))


def test_ddp_budget_failure_stops_every_rank(tmp_path, record):
    proc, results = _run(tmp_path, {"disk_budget": 100, "on_exceed": "abort"})
    assert [results[r]["outcome"] for r in ("0", "1")] == ["BudgetExceededError"] * 2, proc.stderr[-3000:]
    assert not (tmp_path / "s").exists()
    record(outcomes=[results[r]["outcome"] for r in ("0", "1")], files=0)


def test_ddp_downsample_decision_reaches_every_rank(tmp_path, record):
    budget = series_bytes(SnapshotLayout(50, 8, "bfloat16"), 6, 2)
    proc, results = _run(tmp_path, {"disk_budget": budget}, check=True)
    assert [results[r]["every"] for r in ("0", "1")] == [2, 2]
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6]
    record(intervals=[results[r]["every"] for r in ("0", "1")], steps=[2, 4, 6])


FAILING_PLAN = DEFAULT_PRELUDE + """
import budget_callback.lightning.session as session
def broken_plan(*args, **kwargs):
    raise KeyError("a fault nobody listed")
session.plan_fit = broken_plan
"""


def test_any_error_in_the_fit_start_decision_reaches_every_rank(tmp_path, record):
    """Not only ValueError: rank 0 raises its own error, rank 1 a clear one naming it; nobody hangs."""
    proc, results = _run(tmp_path, {}, prelude=FAILING_PLAN)
    assert results["0"]["outcome"] == "KeyError" and "a fault nobody listed" in results["0"]["message"]
    assert results["1"]["outcome"] == "RuntimeError"
    assert "rank 0 failed with KeyError: 'a fault nobody listed'" in results["1"]["message"]
    assert not (tmp_path / "s").exists()
    record(rank0=results["0"]["outcome"], rank1=results["1"]["outcome"])


def test_ddp_spawn_main_process_reports_rank_zeros_figures(tmp_path, record):
    proc, results = _run(tmp_path, {"save_every_n_steps": 2}, strategy='"ddp_spawn"', spawn=True, check=True)
    main = results["main"]
    on_disk = sum(os.path.getsize(p) for p in (tmp_path / "s").glob("*.safetensors"))
    assert main["outcome"] == "ok" and main["every"] == 2 and main["decision"] == "fits"
    assert main["bytes_written"] == main["projected_bytes"] == on_disk > 0
    record(main_process=dict(bytes_written=main["bytes_written"], projected=main["projected_bytes"]))


def test_ddp_spawn_budget_failure_reaches_the_caller_as_budget_exceeded(tmp_path, record):
    """torch delivers a spawned rank's error as ProcessRaisedException (only its traceback text): the caller's
    `except BudgetExceededError` must work as under every other strategy."""
    proc, results = _run(tmp_path, {"disk_budget": 100, "on_exceed": "abort"}, strategy='"ddp_spawn"', spawn=True)
    assert results["main"]["outcome"] == "BudgetExceededError", proc.stderr[-3000:]
    assert "does not fit its budget" in results["main"]["message"]
    assert "Traceback" not in results["main"]["message"] and not (tmp_path / "s").exists()
    record(main=results["main"]["outcome"])


FAILING_STEP = DEFAULT_PRELUDE + """
class Failing(TinyLM):
    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise RuntimeError("the user's code failed at batch 3")
        return super().training_step(batch, batch_idx)
def make_module():
    return Failing()
"""


def test_ddp_spawn_fit_that_raises_keeps_every_snapshot_taken(tmp_path, record):
    """Lightning calls no hook in a ddp_spawn worker whose fit raised (no on_exception, no teardown): the
    snapshots captured before the error are still written, the manifest says failed, the lock is released."""
    proc, results = _run(tmp_path, {}, strategy='"ddp_spawn"', prelude=FAILING_STEP, spawn=True)
    assert "the user's code failed at batch 3" in results["main"]["message"], proc.stderr[-3000:]
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["files_written"] == 3
    assert not (tmp_path / "s" / ".budget-callback.lock").exists()
    record(steps=[1, 2, 3], status=manifest["status"])


SHARDED = """
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

class Sharded(TinyLM):
    def configure_model(self):
        for block in self.model.blocks:
            fully_shard(block)
        fully_shard(self.model)

class FullW(L.Callback):
    seen = {}
    def on_train_batch_end(self, trainer, module, *args):
        w = module.model.lm_head.weight
        full = w.full_tensor()  # every rank gathers; rank 0 keeps it
        if trainer.is_global_zero:
            FullW.seen[trainer.global_step] = full.clone()
            FullW.local = tuple(w.to_local().shape)

def make_module():
    return Sharded()
def extra_callbacks():
    return [FullW()]
def report(trainer, cb):
    if not trainer.is_global_zero or cb.forecast is None:
        return {}
    torch.save(FullW.seen, os.path.join(os.path.dirname(cb.snapshot_dir), "full_w.pt"))
    return {"local_shape": FullW.local, "capture": cb.forecast.memory["phases"]["snapshot_capture"]["other"],
            "strategy": cb.forecast.inputs.setup.strategy}
"""


@pytest.mark.skipif(not hasattr(strategies, "ModelParallelStrategy"),
                    reason=f"ModelParallelStrategy is new in Lightning 2.3 (this is {lightning.__version__})")
@pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"),
                    reason=f"FSDP2 on the CPU needs torch.cpu.Stream.record_event, new in torch 2.7 (this is "
                           f"{torch.__version__}): torch's own fully_shard fails before the callback runs")
def test_fully_sharded_w_is_gathered_and_equals_the_full_matrix(tmp_path, record):
    """ModelParallelStrategy + fully_shard (FSDP2, W a DTensor), 2 CPU processes with gloo."""
    proc, results = _run(tmp_path, {"snapshot_dtype": "float32"},
                         strategy="ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)",
                         prelude=SHARDED, check=True)
    r0 = results["0"]
    assert r0["outcome"] == results["1"]["outcome"] == "ok"
    assert r0["local_shape"] == [25, 8]  # each rank holds half of W's rows
    full = torch.load(tmp_path / "full_w.pt")
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == [1, 2, 3, 4, 5, 6]
    for step in reader.steps:
        assert torch.equal(reader.load(step), full[step])  # bit for bit
    assert r0["strategy"] == "fsdp" and r0["capture"] >= 50 * 8 * 4  # the gathered fp32 W is in the forecast
    assert r0["bytes_written"] == r0["projected_bytes"]
    record(local_shape=r0["local_shape"], steps=reader.steps, capture_bytes=r0["capture"])


FAILING_WRITER = DEFAULT_PRELUDE + """
from datetime import timedelta
from lightning.pytorch.strategies import DDPStrategy
import budget_callback.snapshots.diskio as diskio
real_write = diskio.write_snapshot_file
def failing(path, *args, **kwargs):
    if os.path.basename(str(path)).startswith((".step_000000003", "step_000000003")):
        raise RuntimeError("disk controller on fire")
    return real_write(path, *args, **kwargs)
diskio.write_snapshot_file = failing
def report(trainer, cb):
    return {"stopped_at": trainer.global_step}
"""
# rank 0 lives on after its fit raised, until the other rank has ended (as a user's script or W&B may keep it)
RANK_ZERO_LIVES_ON = """
    if rank == "0":
        for proc in getattr(t.strategy.launcher, "procs", []):
            proc.wait()
"""


def test_a_writer_failure_on_rank_zero_stops_every_rank_with_its_cause(tmp_path, record):
    """Before: rank 1 waited in the next collective as long as rank 0 lived (here up to the process group's
    60 s timeout), then failed with gloo's own error, which does not say why."""
    proc, results = _run(tmp_path, {}, strategy="DDPStrategy(timeout=timedelta(seconds=60))",
                         prelude=FAILING_WRITER, max_steps=20, epilogue=RANK_ZERO_LIVES_ON)
    r0, r1 = results["0"], results["1"]
    assert r0["outcome"] == r1["outcome"] == "SnapshotWriteError", proc.stderr[-3000:]
    assert "disk controller on fire" in r0["message"] and "disk controller on fire" in r1["message"]
    assert "rank 0's snapshot writer failed" in r1["message"]
    assert r0["stopped_at"] == r1["stopped_at"] <= 6  # one batch end after rank 0 saw it, of 20 steps
    assert f"every rank stops at step {r1['stopped_at']}" in r1["message"]
    record(rank0=r0["message"][:120], rank1=r1["message"][:160], stopped_at=r1["stopped_at"])
