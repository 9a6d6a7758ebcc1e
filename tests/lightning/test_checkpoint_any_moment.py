"""A checkpoint taken at any moment of a step resumes to the same snapshot files as a run never interrupted.

The property: for every hook of a step (Lightning's own and a user callback's, listed before or after
BudgetCallback), and for a checkpoint written while an exception ends the fit, a resume from that checkpoint
leaves exactly the files of an uninterrupted run (same names, same bytes: same steps and tensor values), and
``bytes_written == projected_bytes ==`` their sizes. Every batch holds the same tokens and AdamW is
deterministic on the CPU, so W after step s does not depend on where the run was interrupted.
"""

import os
import shutil
import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint

from budget_callback import BudgetCallback, SnapshotReader
from helpers import same_batches, seeded_lm, trainer

HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_train_batch_end")
STEPS = 5
AT = 2  # checkpoints are taken while global_step == AT (the batch ending step AT, or the one making step AT + 1)
# (save_every_n_steps, snapshots_per_file, hooks resumed from): every hook where both an interval above 1 and
# stacked files are in play, the batch end (where a checkpoint used to lose its step) in the other two
CONFIGS = [(1, 1, HOOKS), (2, 3, HOOKS), (2, 1, ("on_train_batch_end",)), (1, 3, ("on_train_batch_end",))]


class SaveAtEveryHook(Callback):
    """Writes a checkpoint at each hook of the step where ``global_step == at`` (a user callback)."""

    def __init__(self, directory, label: str, at: int = AT):
        self.directory, self.label, self.at = directory, label, at

    def _save(self, trainer, hook: str) -> None:
        if trainer.global_step == self.at:
            trainer.save_checkpoint(os.path.join(self.directory, f"{self.label}-{hook}.ckpt"))


def _saver(hook):
    def method(self, trainer, *args, **kwargs):
        self._save(trainer, hook)
    return method


for _hook in HOOKS:
    setattr(SaveAtEveryHook, _hook, _saver(_hook))


class RaiseAt(Callback):
    """Ends the fit with an exception at ``hook`` of the step where ``global_step == at``."""

    def __init__(self, hook: str, at: int = AT):
        self.hook, self.at = hook, at
        setattr(self, hook, self._maybe)

    def _maybe(self, trainer, *args, **kwargs):
        if trainer.global_step == self.at:
            raise RuntimeError(f"stopped at {self.hook}")


class SaveOnException(Callback):
    """A user's own checkpoint on exception (listed where the user put it)."""

    def __init__(self, path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception):
        trainer.save_checkpoint(self.path)


def _files(path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in sorted(os.listdir(path)) if n.endswith(".safetensors")}


def _fit(tmp_path, callbacks, ckpt_path=None, max_steps=STEPS):
    checkpointing = any(isinstance(cb, OnExceptionCheckpoint) for cb in callbacks)
    trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=checkpointing).fit(
        seeded_lm(), same_batches(STEPS), ckpt_path=ckpt_path)


def callback(directory, every, per_file) -> BudgetCallback:
    return BudgetCallback(directory, every, "float32", per_file, verbose=False, fsync=False)


_REFERENCE: dict = {}


def uninterrupted(tmp_path_factory, every, per_file) -> dict[str, bytes]:
    """The files of a run never interrupted (one run per configuration, shared by the tests)."""
    if (every, per_file) not in _REFERENCE:
        root = tmp_path_factory.mktemp("straight")
        _fit(root, [callback(root / "s", every, per_file)])
        assert SnapshotReader(root / "s").steps == list(range(every, STEPS + 1, every))
        _REFERENCE[every, per_file] = _files(root / "s")
    return _REFERENCE[every, per_file]


def _resume_matches(tmp_path, snaps, pristine, ckpt, reference, every, per_file):
    shutil.rmtree(snaps)
    shutil.copytree(pristine, snaps)  # the interrupted run's directory as it was left
    cb = callback(snaps, every, per_file)
    _fit(tmp_path, [cb], ckpt_path=ckpt)
    files = _files(snaps)
    where = os.path.basename(ckpt)
    assert sorted(files) == sorted(reference), where
    assert [n for n in files if files[n] != reference[n]] == [], where  # same steps, same bytes, same values
    assert cb.bytes_written == cb.projected_bytes == sum(len(b) for b in files.values()), where
    assert "difference +0 B" in cb.summary(), where


@pytest.mark.parametrize("every,per_file,hooks", CONFIGS)
def test_a_checkpoint_at_any_hook_resumes_to_the_uninterrupted_files(tmp_path, tmp_path_factory, every, per_file,
                                                                    hooks, record):
    reference = uninterrupted(tmp_path_factory, every, per_file)
    snaps, ckpts = tmp_path / "s", tmp_path / "ckpt"
    ckpts.mkdir()
    cb = callback(snaps, every, per_file)
    _fit(tmp_path, [SaveAtEveryHook(ckpts, "before"), cb, SaveAtEveryHook(ckpts, "after")])
    shutil.copytree(snaps, tmp_path / "pristine")
    taken = sorted(os.listdir(ckpts))
    assert len(taken) == 2 * len(HOOKS)
    taken = [name for name in taken if name.split("-", 1)[1].removesuffix(".ckpt") in hooks]
    for name in taken:
        _resume_matches(tmp_path, snaps, tmp_path / "pristine", str(ckpts / name), reference, every, per_file)
    record(every=every, snapshots_per_file=per_file, checkpoints=len(taken), files=len(reference))


@pytest.mark.parametrize("hook,every,per_file", [("on_train_batch_end", 1, 1), ("on_train_batch_end", 2, 3),
                                                 ("on_after_backward", 2, 3)])
def test_a_checkpoint_on_exception_resumes_to_the_uninterrupted_files(tmp_path, tmp_path_factory, hook, every,
                                                                      per_file):
    reference = uninterrupted(tmp_path_factory, every, per_file)
    snaps = tmp_path / "s"
    cb = callback(snaps, every, per_file)
    callbacks = [RaiseAt(hook), SaveOnException(str(tmp_path / "user.ckpt")), cb,
                 OnExceptionCheckpoint(str(tmp_path), "lightning")]
    with pytest.raises(RuntimeError, match=f"stopped at {hook}"):
        _fit(tmp_path, callbacks)
    shutil.copytree(snaps, tmp_path / "pristine")
    for ckpt in ("user.ckpt", "lightning.ckpt"):
        _resume_matches(tmp_path, snaps, tmp_path / "pristine", str(tmp_path / ckpt), reference, every, per_file)


def test_a_checkpoint_before_the_series_started_resumes_its_own_run(tmp_path, tmp_path_factory):
    """Written at the first ``on_train_batch_start`` by a callback listed before ours: the series had not started.
    Before: the resume found the run's own later snapshots and refused them as another run's."""
    reference = uninterrupted(tmp_path_factory, 1, 3)
    snaps, ckpts = tmp_path / "s", tmp_path / "ckpt"
    ckpts.mkdir()

    class First(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 0:
                trainer.save_checkpoint(ckpts / "before-on_train_batch_start.ckpt")

    _fit(tmp_path, [First(), callback(snaps, 1, 3)])
    assert os.listdir(ckpts) == ["before-on_train_batch_start.ckpt"]
    shutil.copytree(snaps, tmp_path / "pristine")
    _resume_matches(tmp_path, snaps, tmp_path / "pristine", str(ckpts / "before-on_train_batch_start.ckpt"),
                    reference, 1, 3)


def test_a_checkpoint_by_a_signal_handler_inside_the_callbacks_own_batch_end(tmp_path, tmp_path_factory):
    """A real signal arrives while BudgetCallback records step AT + 1 (it reads W there); the handler writes a
    checkpoint, as Lightning's SLURM handler does. The queues may be held by the interrupted code: the checkpoint
    carries the series before that batch end, made durable as the batch end finishes."""
    reference = uninterrupted(tmp_path_factory, 1, 3)
    holder = {}

    def on_signal(signum, frame):
        holder["trainer"].save_checkpoint(tmp_path / "signal.ckpt")

    def unembedding(module):
        if module.trainer.global_step == AT + 1 and not (tmp_path / "signal.ckpt").exists():
            os.kill(os.getpid(), signal.SIGUSR2)  # handled at the next bytecode: inside this callback's hook
            assert (tmp_path / "signal.ckpt").exists()
        return module.model.lm_head.weight

    snaps = tmp_path / "s"
    cb = BudgetCallback(snaps, 1, "float32", 3, unembedding=unembedding, verbose=False, fsync=False)
    t = trainer(tmp_path, [cb], max_steps=STEPS)
    holder["trainer"] = t
    previous = signal.signal(signal.SIGUSR2, on_signal)
    try:
        t.fit(seeded_lm(), same_batches(STEPS))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    state = next(v for k, v in torch.load(tmp_path / "signal.ckpt", weights_only=False)["callbacks"].items()
                 if k.startswith("BudgetCallback"))
    assert state["schedule"]["last_step"] == AT  # the batch end being recorded is not in it
    shutil.copytree(snaps, tmp_path / "pristine")
    _resume_matches(tmp_path, snaps, tmp_path / "pristine", str(tmp_path / "signal.ckpt"), reference, 1, 3)
