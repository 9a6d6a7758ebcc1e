"""Cluster endings for real: SLURM preemption through Lightning's own signal handling, and Ctrl-C from outside.

Each job is a real subprocess. The parent sends the real signal while the child waits on a pipe at a known point
(nothing is timed); a fake ``scontrol`` on PATH records the requeue and tells the parent, through a FIFO, that
Lightning's handler has saved its checkpoint. The resumed series is compared with a run never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from budget_callback import BudgetCallback, SnapshotReader
from helpers import same_batches, seeded_lm, trainer

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY, PER_FILE = 10, 1, 3

JOB = textwrap.dedent("""
    import json, os, sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.filterwarnings("ignore")
    import lightning as L
    from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from budget_callback import BudgetCallback
    from helpers import same_batches, seeded_lm

    def wait_for_parent(what):
        print(what, flush=True)
        sys.stdin.readline()

    class WaitAt(Callback):
        '''Listed before BudgetCallback: at step `at`, after the optimizer step, before the callback records it.'''
        def __init__(self, at, what):
            self.at, self.what = at, what
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.at:
                wait_for_parent(self.what)

    def unembedding(module):
        w = module.model.lm_head.weight
        if module.trainer.global_step == {capture_wait!r}:  # Ctrl-C while W is being captured
            wait_for_parent("capturing")
        return w

    cb = BudgetCallback({snaps!r}, {every}, "float32", {per_file}, unembedding=unembedding, verbose=False)
    callbacks = [WaitAt(at, what) for at, what in {waits!r}] + [cb, OnExceptionCheckpoint({root!r}, "interrupted")]
    plugins = [SLURMEnvironment(auto_requeue=True)] if {slurm!r} else []
    t = L.Trainer(max_steps={steps}, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir={root!r}, callbacks=callbacks, plugins=plugins)
    t.fit(seeded_lm(), same_batches({steps}))  # a requeued job resumes from hpc_ckpt_*.ckpt by itself
    print("result " + json.dumps({{"written": cb.bytes_written, "projected": cb.projected_bytes,
                                   "summary": cb.summary()}}), flush=True)
""")

SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}


def _job(tmp_path, env, waits=(), capture_wait=None, slurm=True) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=str(ROOT / "tests"), snaps=str(tmp_path / "s"), every=EVERY, per_file=PER_FILE,
                                 waits=list(waits), capture_wait=capture_wait, root=str(tmp_path), slurm=slurm,
                                 steps=STEPS))
    return subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(proc: subprocess.Popen, line: str) -> None:
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"the job ended before {line!r}: {proc.wait()} {proc.stderr.read()[-3000:]}")


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("result "))[7:])


def _files(path) -> dict[str, bytes]:
    return {n: (path / n).read_bytes() for n in sorted(os.listdir(path)) if n.endswith(".safetensors")}


def _uninterrupted(tmp_path) -> dict[str, bytes]:
    cb = BudgetCallback(tmp_path / "straight", EVERY, "float32", PER_FILE, verbose=False)
    trainer(tmp_path, [cb], max_steps=STEPS).fit(seeded_lm(), same_batches(STEPS))
    return _files(tmp_path / "straight")


@pytest.fixture
def fake_scontrol(tmp_path):
    """``scontrol`` on PATH: records its arguments, then tells the parent through a FIFO."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fifo, record = tmp_path / "requeued.fifo", tmp_path / "scontrol.log"
    os.mkfifo(fifo)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\necho requeued > {fifo}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ENV, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return env, fifo, record


def test_slurm_preemption_after_the_optimizer_step_requeues_to_the_same_series(tmp_path, fake_scontrol, record):
    """SIGUSR1 arrives after step 4's optimizer update, before BudgetCallback records step 4; Lightning's handler
    saves hpc_ckpt_1.ckpt and requeues. The job goes on to step 7 and is killed; the requeued job resumes by itself.
    Before: steps [1..3, 5..10], and the resumed run said written == projected."""
    env, fifo, log = fake_scontrol
    first = _job(tmp_path, env, waits=[(4, "preempt here"), (7, "kill here")])
    _until(first, "preempt here")
    first.send_signal(signal.SIGUSR1)
    assert fifo.read_text().strip() == "requeued"  # the handler has saved its checkpoint and requeued the job
    first.stdin.write("go\n")
    first.stdin.flush()
    _until(first, "kill here")
    first.kill()  # SLURM ends the job
    first.wait()
    assert log.read_text().split() == ["requeue", "4242"]
    assert [p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]

    requeued = _result(_job(tmp_path, env))
    files = _files(tmp_path / "s")
    reference = _uninterrupted(tmp_path)
    assert SnapshotReader(tmp_path / "s").steps == list(range(1, STEPS + 1))
    assert files == reference  # same files, same bytes, same values as a run never preempted
    assert requeued["written"] == requeued["projected"] == sum(len(b) for b in files.values())
    record(steps=SnapshotReader(tmp_path / "s").steps, files=len(files), bytes=requeued["written"],
           requeue=log.read_text().strip())


def test_ctrl_c_while_w_is_captured_resumes_to_the_same_series(tmp_path, record):
    """SIGINT from outside while W of step 5 is being read; OnExceptionCheckpoint saves on the way out. Before: the
    checkpoint counted step 5, which was never written, and the resume kept the gap (-9,768 B from then on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    job = _job(tmp_path, env, capture_wait=5, slurm=False)
    _until(job, "capturing")
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=300)
    # Lightning shuts down gracefully on Ctrl-C; from 2.3 on it then exits 1 and says so, 2.2 returns from fit
    # (its word is a warning, silenced in the job): the summary says the run stopped on the exception
    assert job.returncode in (0, 1) and ("KeyboardInterrupt" in out + err or "stopped by an exception" in out + err), \
        err[-3000:]
    ckpt = tmp_path / "interrupted.ckpt"
    assert ckpt.exists()

    cb = BudgetCallback(tmp_path / "s", EVERY, "float32", PER_FILE, verbose=False)
    trainer(tmp_path, [cb], max_steps=STEPS).fit(seeded_lm(), same_batches(STEPS), ckpt_path=str(ckpt))
    files = _files(tmp_path / "s")
    assert files == _uninterrupted(tmp_path)
    assert cb.bytes_written == cb.projected_bytes == sum(len(b) for b in files.values())
    record(steps=SnapshotReader(tmp_path / "s").steps, bytes=cb.bytes_written)
