"""Faults produced for real: a full tmpfs, SIGKILL mid-write, a crash then resume, a slow or dead writer,
two DDP processes, a read-only directory. Each test states what it checks."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from budget_callback import BudgetCallback, SnapshotReader
from budget_callback.errors import SnapshotWriteError
from budget_callback.forecast.shapes import ModelShape
from helpers import Filler, TinyLM, stall_first_write, tmpfs, token_loader, trainer

ROOT = Path(__file__).resolve().parents[1]
WIDE = ModelShape(vocab_size=5000, d_model=64, n_layer=1, n_head=2, n_ctx=8, name="wide")  # 640 kB per bf16 W


def _no_partials(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".") or "tmp" in n]


def _all_load(directory: Path) -> SnapshotReader:
    reader = SnapshotReader(directory)
    for step in reader.steps:
        assert reader.load(step).shape == (WIDE.vocab_size, WIDE.d_model)
    return reader


def test_disk_fills_mid_run_guard_raises_interval_on_real_tmpfs(tmp_path, record):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        cb = BudgetCallback(disk / "snaps")
        filler = Filler(disk / "other.bin", at_step=6, nbytes=3_500_000)
        t = trainer(tmp_path, [cb, filler], max_steps=30)
        t.fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        assert t.global_step == 30  # training went on to the end
        assert cb.forecast.save_every_n_steps > 1  # setup already downsampled to fit 8 MB
        raised = [e for e in cb.events if e["event"] in ("disk_guard_raise_interval", "disk_guard_pause")]
        assert raised, cb.events
        reader = _all_load(disk / "snaps")
        assert _no_partials(disk / "snaps") == []
        assert cb.bytes_written == sum(os.path.getsize(disk / "snaps" / n) for n in os.listdir(disk / "snaps")
                                       if n.endswith(".safetensors"))
        assert len(reader) >= 2
        # the snapshot due at the step the interval was raised was taken: nothing skipped, nothing lost
        assert cb.series.lost == 0 and cb.bytes_written == cb.projected_bytes
        expected, start, every = [], 1, cb.forecast.save_every_n_steps  # the schedule, change by change
        for change in raised + [{"step": 30, "every": None}]:
            expected += [s for s in range(start, change["step"] + 1) if every and s % every == 0]
            start, every = change["step"] + 1, change["every"]
        assert reader.steps == expected
        record(setup_interval=cb.forecast.save_every_n_steps, events=[e["event"] + f"@{e['step']}" for e in cb.events],
               final_interval=cb.save_every_n_steps, readable=len(reader), partial=0, reached=t.global_step,
               bytes_written=cb.bytes_written, tmpfs_bytes=8 * 2**20)


def test_enospc_on_real_tmpfs_leaves_no_partial_file(tmp_path, record):
    with tmpfs(tmp_path / "disk", "6m") as disk:
        cb = BudgetCallback(disk / "snaps", disk_budget="5MB", on_exceed="warn")  # the guard only warns
        filler = Filler(disk / "other.bin", at_step=3, nbytes=10_000_000)  # fills the disk completely
        t = trainer(tmp_path, [cb, filler], max_steps=12)
        with pytest.warns(UserWarning):
            t.fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        assert t.global_step == 12
        series = cb.series
        assert series.lost >= 1 and any(e["event"] == "disk_full" for e in series.events)
        reader = _all_load(disk / "snaps")
        assert _no_partials(disk / "snaps") == []
        assert len(reader) + series.lost == 12 // cb.save_every_n_steps
        assert f"lost to a full disk {series.lost}" in cb.summary()
        first = next(e for e in series.events if e["event"] == "disk_full")
        record(first_enospc_step=first["step"], snapshots_due=12 // cb.save_every_n_steps, failed=series.lost,
               readable=len(reader), partial=0, reached=t.global_step)


class FullDuringCheckpoint(Callback):
    """Another writer fills the disk to the last byte just before the checkpoint at ``at`` and frees it after."""

    def __init__(self, path: Path, at: int):
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, *args):  # ModelCheckpoint runs after every other callback
        if trainer.global_step == self.at:
            with open(self.path, "wb") as fh:
                try:
                    fh.write(b"\0" * (64 << 20))
                except OSError as err:
                    assert err.errno == errno.ENOSPC

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            self.path.unlink(missing_ok=True)


def test_full_disk_at_a_checkpoint_loses_no_stacked_snapshot(tmp_path, record):
    """snapshots_per_file=4 on a real 8 MiB tmpfs, full while the step-2 checkpoint writes the open file [1, 2].
    Before: those snapshots were counted in budget/snapshots_failed although all 8 ended on disk."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    with tmpfs(tmp_path / "disk", "8m") as disk:
        cb = BudgetCallback(disk / "snaps", snapshots_per_file=4, on_exceed="warn")
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        t = trainer(tmp_path, [cb, FullDuringCheckpoint(disk / "other.bin", 2), ckpt], max_steps=8,
                    enable_checkpointing=True, logger=CSVLogger(tmp_path))
        t.fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        full = [e for e in cb.events if e["event"] == "disk_full"]
        assert full and full[0]["snapshots"] == 0, cb.events  # the checkpoint could not write the open file
        assert cb.series.lost == 0 and "lost to a full disk 0" in cb.summary()
        reader = _all_load(disk / "snaps")
        assert reader.steps == list(range(1, 9))
        assert cb.bytes_written == cb.projected_bytes == sum(
            os.path.getsize(disk / "snaps" / n) for n in os.listdir(disk / "snaps") if n.endswith(".safetensors"))
        rows = (Path(t.logger.log_dir) / "metrics.csv").read_text().splitlines()
        failed = rows[0].split(",").index("budget/snapshots_failed")
        assert {r.split(",")[failed] for r in rows[1:]} - {""} == {"0"}
        record(event=full[0]["reason"][:80], lost=0, readable=len(reader), bytes=cb.bytes_written)


def test_a_snapshot_removed_by_hand_is_seen_at_the_next_checkpoint(tmp_path, record):
    """Before: manifest and bytes_written kept counting the file until a resume found it gone."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class RemoveAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                (tmp_path / "s" / "step_000000002.safetensors").unlink()

    cb = BudgetCallback(tmp_path / "s")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    t = trainer(tmp_path, [cb, RemoveAt(), ckpt], max_steps=8, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"1 snapshot file\(s\) in .* were removed or changed by something else: "
                                         r"step_000000002.safetensors \(missing\)"):
        t.fit(TinyLM(), token_loader())
    on_disk = [n for n in os.listdir(tmp_path / "s") if n.endswith(".safetensors")]
    assert len(on_disk) == 7 and cb.bytes_written == sum(os.path.getsize(tmp_path / "s" / n) for n in on_disk)
    seen = next(e for e in cb.events if e["event"] == "files_missing")
    assert seen["step"] == 6  # the step-6 checkpoint, not a resume
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["files_written"] == 7 and manifest["bytes_written"] == cb.bytes_written
    assert manifest["snapshots_missing"] == 1 and "removed by something else 1" in cb.summary()
    record(seen_at=seen["step"], files=len(on_disk), bytes=cb.bytes_written, projected=cb.projected_bytes)


def test_wandb_staging_on_the_snapshots_disk_is_counted_where_it_lands(tmp_path, monkeypatch, record):
    """log_model="all": W&B copies each checkpoint into WANDB_DATA_DIR, here on the snapshots' 8 MiB tmpfs while
    the checkpoints go elsewhere. Before: the forecast left the copies out, said "fits", and the run died in
    wandb's shutil.copyfile with ENOSPC."""
    import wandb
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import WandbLogger

    with tmpfs(tmp_path / "disk", "8m") as disk:
        monkeypatch.setenv("WANDB_DATA_DIR", str(disk / "wandb-data"))  # W&B offline from the environment
        logger = WandbLogger(project="budget-test", save_dir=str(tmp_path), log_model="all")
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
        cb = BudgetCallback(disk / "snaps", verbose=False)
        t = trainer(tmp_path, [cb, ckpt], max_steps=20, logger=logger, enable_checkpointing=True, log_every_n_steps=5)
        try:
            t.fit(TinyLM(WIDE, optimizer="sgd"), token_loader(vocab=5000, n=400))
        finally:
            wandb.finish()
        st = cb.forecast.storage
        staged = sorted(p.stat().st_size for p in (disk / "wandb-data" / "artifacts" / "staging").iterdir())
        checkpoints = [size for size in staged if size > 100_000]  # the rest: W&B's copies of the logged tables
        assert len(checkpoints) == 2 and st["wandb_staging_bytes"] > 1_000_000, staged
        assert abs(sum(checkpoints) - st["wandb_staging_bytes"]) < 0.001 * sum(checkpoints)  # the .ckpt estimate
        assert sum(staged) - sum(checkpoints) < 100_000, staged
        assert st["wandb_staging_on_disk_bytes"] == st["wandb_staging_bytes"]  # counted on this disk...
        assert st["checkpoints_bytes"] > 0 and st["total_bytes"] == (  # ... the checkpoints, elsewhere, are not
            st["snapshot_bytes"] + st["rewrite_headroom_bytes"] + st["wandb_staging_bytes"])
        assert cb.forecast.decision == "downsampled" and t.global_step == 20
        assert cb.bytes_written == cb.projected_bytes and cb.series.lost == 0
        record(interval=cb.save_every_n_steps, staging_bytes=st["wandb_staging_bytes"], snapshots=cb.bytes_written)


def test_abort_policy_stops_cleanly_through_the_trainer(tmp_path, record):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        cb = BudgetCallback(disk / "snaps", on_exceed="abort", save_every_n_steps=3)
        filler = Filler(disk / "other.bin", at_step=4, nbytes=5_000_000)
        t = trainer(tmp_path, [cb, filler], max_steps=30)
        t.fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        assert 4 <= t.global_step < 30
        assert cb.stop_reason and "disk guard stopped the run" in cb.stop_reason
        reader = _all_load(disk / "snaps")
        assert reader.steps == list(range(3, t.global_step + 1, 3))
        record(stopped_at=t.global_step, max_steps=30, readable=len(reader), message=cb.stop_reason)


def test_injected_enospc_portable(tmp_path, monkeypatch, record):
    """The same error path without a tmpfs: the write of step 4 raises ENOSPC."""
    import budget_callback.snapshots.diskio as diskio

    real = diskio.write_snapshot_file

    def failing(path, header, tensors, *args, **kwargs):
        if Path(path).name == "step_000000004.safetensors":
            tmp = diskio.temporary_path(path)
            tmp.write_bytes(b"half a file")
            tmp.unlink()  # the writer's cleanup of a failed temporary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, header, tensors, *args, **kwargs)

    monkeypatch.setattr(diskio, "write_snapshot_file", failing)
    cb = BudgetCallback(tmp_path / "s")
    t = trainer(tmp_path, [cb], max_steps=8)
    t.fit(TinyLM(), token_loader())
    assert t.global_step == 8
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3, 5, 6, 7, 8]
    assert _no_partials(tmp_path / "s") == []
    assert cb.series.lost == 1 and cb.bytes_written < cb.projected_bytes
    record(enospc_step=4, readable=len(SnapshotReader(tmp_path / "s")), partial=0, reached=t.global_step)


def test_slow_writer_waits_and_reports_backpressure(tmp_path, monkeypatch, record):
    cb = BudgetCallback(tmp_path / "s", queue_depth=1)
    stall_first_write(monkeypatch, lambda: cb._fit.capture.stats.waits >= 1)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=10, logger=logger, log_every_n_steps=5).fit(TinyLM(), token_loader(n=100))
    stats = cb._fit.capture.stats
    assert stats.waits >= 1 and stats.backpressure_seconds > 0
    assert SnapshotReader(tmp_path / "s").steps == list(range(1, 11))  # waited: nothing lost
    assert cb.bytes_written == cb.projected_bytes
    assert cb._fit.capture.host_bytes == 3 * 4096  # RAM bounded: queue_depth + 2 page-aligned file images
    text = open(os.path.join(logger.log_dir, "metrics.csv")).read()
    assert "budget/writer_backpressure_seconds" in text
    record(backpressure_seconds=round(stats.backpressure_seconds, 3), waits=stats.waits, written=10, lost=0,
           queue_depth=1)


def test_slow_writer_drops_and_counts(tmp_path, monkeypatch, record):
    cb = BudgetCallback(tmp_path / "s", queue_depth=1, when_behind="drop")
    stall_first_write(monkeypatch, lambda: cb._fit.series.dropped >= 1)
    trainer(tmp_path, [cb], max_steps=10).fit(TinyLM(), token_loader(n=100))
    series = cb.series
    assert series.dropped >= 1
    assert len(SnapshotReader(tmp_path / "s")) + series.dropped == 10
    assert f"dropped {series.dropped}" in cb.summary() and any(e["event"] == "dropped" for e in series.events)
    record(dropped=series.dropped, written=len(SnapshotReader(tmp_path / "s")), due=10)


def test_dead_writer_surfaces_at_the_next_step(tmp_path, monkeypatch, record):
    import budget_callback.snapshots.diskio as diskio

    def broken(*a, **k):
        raise RuntimeError("controller on fire")

    monkeypatch.setattr(diskio, "write_snapshot_file", broken)
    seen = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.global_step)

    cb = BudgetCallback(tmp_path / "s")
    with pytest.raises(SnapshotWriteError, match="controller on fire") as info:
        trainer(tmp_path, [cb, Steps()], max_steps=50).fit(TinyLM(), token_loader(n=400))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert max(seen) <= 3  # raised within a step or two, not at teardown after step 50
    record(failed_write_step=1, raised_after_step=max(seen), max_steps=50)


def test_read_only_snapshot_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        with pytest.raises(ValueError, match="not writable"):
            trainer(tmp_path, [BudgetCallback(ro / "snaps")], max_steps=1).fit(TinyLM(), token_loader())


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, os
    sys.path.insert(0, {tests!r})
    import budget_callback.snapshots.diskio as d
    from budget_callback import BudgetCallback
    from lightning.pytorch.callbacks import ModelCheckpoint
    from helpers import Filler, TinyLM, tmpfs, token_loader, trainer
    real = d.write_snapshot_file
    def slow(path, header, tensors, *args, **kwargs):
        if path.name == "step_000000006.safetensors":
            with open(d.temporary_path(path), "wb") as fh:  # half of the file is on disk ...
                fh.write(header[:1000]); fh.flush(); os.fsync(fh.fileno())
            print("WRITING", flush=True)      # ... tell the parent, and wait to be killed
            time.sleep(600)
        return real(path, header, tensors, *args, **kwargs)
    d.write_snapshot_file = slow
    cb = BudgetCallback({snaps!r})
    ckpt = ModelCheckpoint(dirpath={ckpt!r}, every_n_train_steps=4, save_top_k=-1)
    trainer({root!r}, [cb, ckpt], max_steps=20, enable_checkpointing=True).fit(TinyLM(), token_loader(n=200))
""")


def test_sigkill_mid_write_then_resume(tmp_path, record):
    snaps, ckpt = tmp_path / "s", tmp_path / "ckpt"
    script = tmp_path / "victim.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests"), snaps=str(snaps), ckpt=str(ckpt),
                                         root=str(tmp_path)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    lines = iter(proc.stdout.readline, "")  # blocks until the victim is inside the write (or exits)
    assert any(line.strip() == "WRITING" for line in lines), "the victim exited before reaching the write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    temporaries = sorted(n for n in os.listdir(snaps) if n.startswith("."))
    # small files are committed in groups: step 5 is a complete temporary not yet renamed, step 6 a partial one
    assert ".step_000000006.safetensors.tmp-" in " ".join(temporaries)
    reader = SnapshotReader(snaps)  # opens, lists only complete files, all load
    assert reader.steps == [1, 2, 3, 4]  # committed at the step-4 checkpoint; nothing later is visible
    for step in reader.steps:
        assert reader.load(step).shape == (50, 8)
    # restart from the step-4 checkpoint: stale temporaries cleaned, step 5 replaced, series continues
    cb = BudgetCallback(snaps)
    path = next(p for p in ckpt.iterdir() if "step=4" in p.name)
    trainer(tmp_path, [cb], max_steps=8).fit(TinyLM(), token_loader(n=200), ckpt_path=str(path))
    assert [n for n in os.listdir(snaps) if n.startswith(".")] == []
    assert SnapshotReader(snaps).steps == list(range(1, 9))
    assert any(e["event"] == "cleaned_temporaries" for e in cb.events)
    record(killed_during_step=6, temporaries_left=len(temporaries), readable_after_kill=len(reader),
           resumed_from=4, steps_after_resume=SnapshotReader(snaps).steps)
