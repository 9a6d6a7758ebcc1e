"""One fit's life with the series: resume, refusal, the lock, fresh state per fit, late-restoring strategies."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.tuner import Tuner

from budget_callback import BudgetCallback, SnapshotReader
from budget_callback.errors import SnapshotDirInUseError
from budget_callback.forecast.shapes import ModelShape
from helpers import Filler, TinyLM, checkpointed_run, tmpfs, token_loader, trainer

ROOT = Path(__file__).resolve().parents[2]
WIDE = ModelShape(vocab_size=5000, d_model=64, n_layer=1, n_head=2, n_ctx=8, name="wide")  # 640 kB per bf16 W


class RecordW(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step] = pl_module.model.lm_head.weight.detach().clone()


def _listing(path):
    return sorted((n, os.path.getsize(path / n)) for n in os.listdir(path))


def _files(path):
    return sorted((n, os.path.getsize(path / n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def test_resume_continues_the_series_and_its_projection(tmp_path):
    first, path = checkpointed_run(tmp_path, tmp_path / "s", save_every_n_steps=2)
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6]  # went on to step 6 after the step-4 checkpoint
    second = BudgetCallback(tmp_path / "s", save_every_n_steps=2)
    rec = RecordW()
    trainer(tmp_path, [second, rec], max_steps=10).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == [2, 4, 6, 8, 10]
    assert second.save_every_n_steps == 2
    assert torch.equal(reader.load(6), rec.seen[6].to(torch.bfloat16))  # the resumed run's step 6, not the old one
    on_disk = sum(size for _, size in _files(tmp_path / "s"))
    assert second.bytes_written == second.projected_bytes == on_disk  # the projection covers the whole series
    assert "by step 10" in second.summary() and "difference +0 B" in second.summary()


def test_a_resume_that_asks_for_another_interval_gets_it_from_the_resume_on(tmp_path, record):
    """Before: the series' interval was kept and nothing said so. The request is honoured from the resume on (the
    disk is checked again), and said; asking the interval the series was started with keeps the series' own."""
    _, path = checkpointed_run(tmp_path, tmp_path / "s", save_every_n_steps=2)
    second = BudgetCallback(tmp_path / "s", save_every_n_steps=3)
    with pytest.warns(UserWarning, match=r"`save_every_n_steps` changed from 2 .* to 3: the series snapshots every 3 "
                                         r"steps from step 5 on"):
        trainer(tmp_path, [second], max_steps=12).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6, 9, 12]
    assert second.save_every_n_steps == 3
    on_disk = sum(size for _, size in _files(tmp_path / "s"))
    assert second.bytes_written == second.projected_bytes == on_disk
    assert any(e["event"] == "warning" and "changed from 2" in e["detail"] for e in second.events)
    record(steps=SnapshotReader(tmp_path / "s").steps, every=second.save_every_n_steps, bytes=on_disk)


def test_resume_mid_stack_continues_the_open_file(tmp_path, record):
    """A resume leaves the same files as a run that was never interrupted."""
    _, path = checkpointed_run(tmp_path, tmp_path / "s", steps=10, ckpt_every=6, snapshots_per_file=4,
                         snapshot_dtype="float32")
    second = BudgetCallback(tmp_path / "s", snapshots_per_file=4, snapshot_dtype="float32")
    rec = RecordW()
    trainer(tmp_path, [second, rec], max_steps=12).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    straight = BudgetCallback(tmp_path / "straight", snapshots_per_file=4, snapshot_dtype="float32")
    trainer(tmp_path, [straight], max_steps=12).fit(TinyLM(), token_loader(n=200))
    assert _files(tmp_path / "s") == _files(tmp_path / "straight")
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == list(range(1, 13))
    for step in (7, 10, 12):  # written by the resumed run
        assert torch.equal(reader.load(step), rec.seen[step])
    assert second.bytes_written == second.projected_bytes == straight.projected_bytes
    record(files=len(_files(tmp_path / "s")), same_as_uninterrupted=True, bytes=second.bytes_written,
           projected=second.projected_bytes)


class Tunable(TinyLM):
    """A module lr_find can tune (it sets ``self.lr``)."""

    def __init__(self):
        super().__init__()
        self.lr = 1e-2


def test_lr_find_then_fit_into_another_runs_directory_is_refused(tmp_path, record):
    """lr_find restores its temporary checkpoint through load_state_dict: that is not a resume of the series."""
    trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=3).fit(TinyLM(), token_loader())
    before = _listing(tmp_path / "s")
    cb = BudgetCallback(tmp_path / "s")
    t = trainer(tmp_path, [cb], max_steps=3)
    Tuner(t).lr_find(Tunable(), train_dataloaders=token_loader(n=200), num_training=5)
    with pytest.raises(ValueError, match="already holds snapshots of run") as info:
        t.fit(Tunable(), token_loader())
    assert _listing(tmp_path / "s") == before
    record(files_before=len(before), files_after=len(_listing(tmp_path / "s")), message=str(info.value)[:160])


def test_lr_find_then_fit_into_an_empty_directory(tmp_path):
    cb = BudgetCallback(tmp_path / "s")
    t = trainer(tmp_path, [cb], max_steps=3)
    Tuner(t).lr_find(Tunable(), train_dataloaders=token_loader(n=200), num_training=5)
    t.fit(Tunable(), token_loader())
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3] and cb.bytes_written == cb.projected_bytes


def test_checkpoint_without_callback_state_does_not_mix_runs(tmp_path, record):
    trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=3).fit(TinyLM(), token_loader())
    before = _listing(tmp_path / "s")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "other", every_n_train_steps=2)
    trainer(tmp_path, [ckpt], max_steps=2, enable_checkpointing=True).fit(TinyLM(), token_loader())
    path = str(next((tmp_path / "other").iterdir()))
    with pytest.raises(ValueError, match="already holds snapshots.*no BudgetCallback state for this snapshot_dir") as info:
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=4).fit(TinyLM(), token_loader(), ckpt_path=path)
    assert _listing(tmp_path / "s") == before
    record(untouched=True, message=str(info.value)[-150:])


def test_relative_then_absolute_spelling_resumes_the_same_series(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, path = checkpointed_run(tmp_path, "s", save_every_n_steps=2)
    monkeypatch.chdir("/")
    second = BudgetCallback(tmp_path / "s", save_every_n_steps=2)
    trainer(tmp_path, [second], max_steps=8).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert second.save_every_n_steps == 2  # the state was found: the interval is restored
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6, 8]
    assert second.bytes_written == second.projected_bytes


def test_chdir_during_training_keeps_one_series(tmp_path, monkeypatch):
    class Wander(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.chdir(tmp_path / "elsewhere")

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    cb = BudgetCallback("snaps")
    trainer(tmp_path, [cb, Wander()], max_steps=5).fit(TinyLM(), token_loader())
    assert SnapshotReader(tmp_path / "snaps").steps == [1, 2, 3, 4, 5]
    assert not (tmp_path / "elsewhere" / "snaps").exists()


def test_a_second_fit_on_the_same_instance_starts_fresh(tmp_path, record):
    """The first fit ends paused on a full disk; the second (space freed) must not inherit the pause."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        cb = BudgetCallback(disk / "snaps", overwrite=True)
        filler = Filler(disk / "other.bin", at_step=4, nbytes=8_000_000)  # leaves less than one snapshot
        t = trainer(tmp_path, [cb, filler], max_steps=12)
        t.fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        assert any(e["event"] == "disk_guard_pause" for e in cb.events) and cb.series.schedule.paused
        (disk / "other.bin").unlink()
        trainer(tmp_path, [cb], max_steps=6).fit(TinyLM(WIDE), token_loader(vocab=5000, n=400))
        assert SnapshotReader(disk / "snaps").steps == list(range(cb.save_every_n_steps, 7, cb.save_every_n_steps))
        assert not cb.series.schedule.paused and cb.bytes_written == cb.projected_bytes > 0
        record(first_fit="paused", second_fit_steps=SnapshotReader(disk / "snaps").steps)


def test_a_second_fit_on_the_same_instance_portable(tmp_path):
    cb = BudgetCallback(tmp_path / "s", overwrite=True, save_every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=6).fit(TinyLM(), token_loader())
    first_run = cb.series.run_id
    trainer(tmp_path, [cb], max_steps=4).fit(TinyLM(), token_loader())
    assert SnapshotReader(tmp_path / "s").steps == [2, 4]
    assert cb.series.run_id != first_run and cb.bytes_written == cb.projected_bytes


def test_resume_with_another_dtype_is_refused(tmp_path, record):
    _, path = checkpointed_run(tmp_path, tmp_path / "s")
    before = _listing(tmp_path / "s")
    with pytest.raises(ValueError, match="`snapshot_dtype` is 'float32' but .* snapshot_dtype='bfloat16'") as info:
        trainer(tmp_path, [BudgetCallback(tmp_path / "s", snapshot_dtype="float32")], max_steps=8).fit(
            TinyLM(), token_loader(n=200), ckpt_path=path)
    assert _listing(tmp_path / "s") == before
    record(untouched=True, message=str(info.value)[:140])


def test_downsampled_run_on_a_tight_disk_resumes(tmp_path, record):
    """The resume counts what is on disk (its own, or to be replaced) as room; it keeps the interval."""
    with tmpfs(tmp_path / "disk", "6m") as disk:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
        first = BudgetCallback(disk / "snaps")
        trainer(tmp_path, [first, ckpt], max_steps=20, enable_checkpointing=True).fit(
            TinyLM(WIDE), token_loader(vocab=5000, n=400))
        k = first.save_every_n_steps
        assert k > 1  # 20 snapshots of 640 kB do not fit 6 MiB
        path = str(next((tmp_path / "ckpt").iterdir()))
        second = BudgetCallback(disk / "snaps")
        trainer(tmp_path, [second], max_steps=20).fit(TinyLM(WIDE), token_loader(vocab=5000, n=400), ckpt_path=path)
        assert second.forecast.decision == "fits" and second.save_every_n_steps == k
        assert SnapshotReader(disk / "snaps").steps == list(range(k, 21, k))
        assert second.bytes_written == second.projected_bytes
        record(interval=k, steps=SnapshotReader(disk / "snaps").steps, bytes=second.bytes_written, tmpfs="6m")


class LateRestore(SingleDeviceStrategy):
    """Restores checkpoint state after setup, as FSDP, DeepSpeed and ModelParallel do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_resume_under_a_strategy_that_restores_late(tmp_path, record):
    _, path = checkpointed_run(tmp_path, tmp_path / "s", save_every_n_steps=2)
    second = BudgetCallback(tmp_path / "s", save_every_n_steps=2)  # without the state: refused (another run's)
    trainer(tmp_path, [second], max_steps=10, strategy=LateRestore(device=torch.device("cpu"))).fit(
        TinyLM(), token_loader(n=200), ckpt_path=path)
    assert second.save_every_n_steps == 2 and SnapshotReader(tmp_path / "s").steps == [2, 4, 6, 8, 10]
    assert second.bytes_written == second.projected_bytes
    record(interval=2, steps=[2, 4, 6, 8, 10], bytes=second.bytes_written)


def test_stale_temporaries_of_any_writer_are_cleaned_at_the_next_start(tmp_path, record):
    _, path = checkpointed_run(tmp_path, tmp_path / "s")
    (tmp_path / "s" / ".tmpXy12Ab").write_bytes(b"left by safetensors' writer when killed")
    (tmp_path / "s" / ".step_000000007.safetensors.tmp-4242").write_bytes(b"ours")
    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=8).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert [n for n in os.listdir(tmp_path / "s") if n.startswith(".")] == []
    cleaned = next(e for e in cb.events if e["event"] == "cleaned_temporaries")
    assert cleaned["count"] == 2
    record(cleaned=cleaned["names"])


HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from lightning.pytorch.callbacks import Callback
    from budget_callback import BudgetCallback
    from helpers import TinyLM, token_loader, trainer

    class Hold(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                print("HOLDING", flush=True)
                sys.stdin.readline()  # until the test has tried its own fit

    trainer({root!r}, [BudgetCallback({snaps!r}), Hold()], max_steps=4).fit(TinyLM(), token_loader())
    print("DONE", flush=True)
""")


def test_two_fits_on_one_directory_at_the_same_time(tmp_path, record):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(tests=str(ROOT / "tests"), root=str(tmp_path), snaps=str(tmp_path / "s")))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert any(line.strip() == "HOLDING" for line in iter(proc.stdout.readline, "")), "the holder never started"
        with pytest.raises(SnapshotDirInUseError, match=rf"in use by another fit \(pid {proc.pid} on .*holder.py") as info:
            trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=2).fit(TinyLM(), token_loader())
        record(message=str(info.value)[:200])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "DONE"
    finally:
        proc.kill()
        proc.wait(30)
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3, 4]  # the holder's series, untouched by the refusal
