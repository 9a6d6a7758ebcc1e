"""Odd inputs, each answered with a message that names the argument or path and what to change (real Trainers,
real files). Each test says what happened before."""

import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from budget_callback import BudgetCallback, SnapshotReader
from helpers import TinyLM, checkpointed_run, tmpfs, token_loader, trainer


def _files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


class TwoHeads(TinyLM):
    """Two vocabulary-sized output layers with names the callback does not know."""

    def __init__(self):
        super().__init__()
        self.policy = nn.Linear(8, 50, bias=False)
        self.critic_tokens = nn.Linear(8, 50, bias=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.model.wte(x)
        logits = self.policy(h) + self.critic_tokens(h)
        return nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1))


def test_two_vocabulary_heads_name_the_choice_and_the_alternatives(tmp_path):
    """Before: one of them was recorded and nothing said which."""
    module = TwoHeads()
    module.model.lm_head = None  # no head with a known name: chosen by shape
    cb = BudgetCallback(tmp_path / "s")
    with pytest.warns(UserWarning, match=r"recording W from parameter 'critic_tokens.weight', the last linear layer "
                                         r"with 50 outputs .*other candidates: 'policy.weight'.*"
                                         r"BudgetCallback\(unembedding='policy.weight'\)"):
        trainer(tmp_path, [cb], max_steps=2).fit(module, token_loader())
    assert torch.equal(SnapshotReader(tmp_path / "s").load(2), module.critic_tokens.weight.detach().to(torch.bfloat16))
    chosen = BudgetCallback(tmp_path / "p", unembedding="policy.weight")  # the named choice: no warning
    trainer(tmp_path, [chosen], max_steps=2).fit(module, token_loader())
    assert not any("other candidates" in e.get("detail", "") for e in chosen.events)


def test_float16_overflow_is_counted_and_warned_once(tmp_path):
    """|W| > 65,504 in float16 snapshots. Before: stored as inf with no event."""
    module = TinyLM()
    with torch.no_grad():
        module.model.lm_head.weight[3, :2] = 1e6
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float16")
    with pytest.warns(UserWarning, match=r"holds 2 infinite value\(s\): W has entries beyond float16's range "
                                         r"\(\|w\| > 65,504\).*snapshot_dtype='bfloat16'") as seen:
        trainer(tmp_path, [cb], max_steps=4).fit(module, token_loader())
    assert sum("float16's range" in str(w.message) for w in seen) == 1  # once
    assert torch.isinf(SnapshotReader(tmp_path / "s").load(4)[3, :2]).all()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["snapshots_float16_overflow"] == 4
    assert [e["event"] for e in cb.events].count("float16_overflow") == 1


def test_a_resume_through_a_symlink_then_the_real_path_is_one_series(tmp_path):
    """Before: the resume through the real path was refused as another run's directory."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _, path = checkpointed_run(tmp_path, tmp_path / "link", save_every_n_steps=2)
    second = BudgetCallback(tmp_path / "real", save_every_n_steps=2)
    trainer(tmp_path, [second], max_steps=8).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert SnapshotReader(tmp_path / "real").steps == [2, 4, 6, 8]
    assert second.bytes_written == second.projected_bytes == sum(
        os.path.getsize(tmp_path / "real" / n) for n in _files(tmp_path / "real"))
    assert second.snapshot_dir == tmp_path / "real" == BudgetCallback(tmp_path / "link").snapshot_dir


def test_a_checkpoint_that_spelled_the_directory_through_a_symlink_still_resumes(tmp_path):
    """A checkpoint written before links were resolved keys its state by the link's spelling."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _, path = checkpointed_run(tmp_path, tmp_path / "real", save_every_n_steps=2)
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"] = {k.replace(str(tmp_path / "real"), str(tmp_path / "link")): {
        **v, "snapshot_dir": str(tmp_path / "link")} for k, v in ckpt["callbacks"].items()}
    torch.save(ckpt, path)
    second = BudgetCallback(tmp_path / "real", save_every_n_steps=2)
    trainer(tmp_path, [second], max_steps=8).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert SnapshotReader(tmp_path / "real").steps == [2, 4, 6, 8]


def test_a_foreign_manifest_is_never_overwritten(tmp_path):
    """Before: refused as "another run (0 files)", then replaced with overwrite=True."""
    (tmp_path / "s").mkdir()
    theirs = json.dumps({"dataset": "wikitext", "shards": 12})
    (tmp_path / "s" / "manifest.json").write_text(theirs)
    for overwrite in (False, True):
        cb = BudgetCallback(tmp_path / "s", overwrite=overwrite)
        with pytest.raises(ValueError, match=r"holds a manifest.json that budget-callback did not write \(a JSON "
                                             r"object with dataset, shards.*overwrite=True does not replace.*"
                                             r"Choose another snapshot_dir"):
            trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(), token_loader())
        assert (tmp_path / "s" / "manifest.json").read_text() == theirs
        assert _files(tmp_path / "s") == []


def test_fast_dev_run_owns_no_series(tmp_path):
    """Before: the smoke test claimed the directory and the real fit after it was refused."""
    smoke = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [smoke], fast_dev_run=True).fit(TinyLM(), token_loader())
    assert smoke.bytes_written == smoke.projected_bytes > 0  # it ran the writer, in a scratch directory
    assert "fast_dev_run: a scratch series, removed at the end" in smoke.summary()
    assert not (tmp_path / "s").exists() and not [p for p in tmp_path.iterdir() if "fast-dev-run" in p.name]
    real = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [real], max_steps=3).fit(TinyLM(), token_loader())
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3]


def test_the_reader_of_an_empty_directory_says_there_are_no_snapshots(tmp_path):
    """Before: "`token_id` must be an int in [0, 0)"."""
    (tmp_path / "s").mkdir()
    reader = SnapshotReader(tmp_path / "s")
    assert len(reader) == 0 and reader.steps == []
    with pytest.raises(IndexError, match=r"holds no snapshots yet .*check snapshot_dir"):
        reader.trajectory(0)
    with pytest.raises(KeyError, match=r"holds no snapshots yet"):
        reader.load(1)


def test_a_resume_with_overwrite_into_another_runs_directory_does_what_overwrite_says(tmp_path):
    """Before: refused, asking for overwrite=True, which had been passed."""
    _, path = checkpointed_run(tmp_path, tmp_path / "s")  # run A: checkpoint at step 4
    trainer(tmp_path, [BudgetCallback(tmp_path / "s", overwrite=True)], max_steps=3).fit(TinyLM(), token_loader())
    resumed = BudgetCallback(tmp_path / "s", overwrite=True)  # resume run A where run B's snapshots are
    with pytest.warns(UserWarning, match=r"held snapshots of run \w+, not of run \w+ .*overwrite=True replaced them"):
        trainer(tmp_path, [resumed], max_steps=7).fit(TinyLM(), token_loader(n=200), ckpt_path=path)
    assert SnapshotReader(tmp_path / "s").steps == [5, 6, 7]
    assert resumed.bytes_written == resumed.projected_bytes
    with pytest.raises(ValueError, match="or pass BudgetCallback\\(overwrite=True\\)"):  # not passed: asked for
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=7).fit(TinyLM(), token_loader(n=200),
                                                                             ckpt_path=path)


def test_a_resume_on_a_nearly_full_disk_names_the_path_and_the_bytes(tmp_path):
    """Before: a bare `OSError: [Errno 28] No space left on device` from the middle of the resume."""
    from budget_callback.forecast.shapes import ModelShape

    wide = ModelShape(vocab_size=5000, d_model=64, n_layer=1, n_head=2, n_ctx=8, name="wide")  # 640 kB per W
    with tmpfs(tmp_path / "disk", "8m") as disk:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
        cb = BudgetCallback(disk / "s", snapshots_per_file=4, on_exceed="warn")
        trainer(tmp_path, [cb, ckpt], max_steps=8, enable_checkpointing=True).fit(
            TinyLM(wide), token_loader(vocab=5000, n=400))
        before = {n: os.path.getsize(disk / "s" / n) for n in _files(disk / "s")}
        with open(disk / "other.bin", "wb") as fh:  # another job leaves 100 kB
            fh.write(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 100_000))
        resumed = BudgetCallback(disk / "s", snapshots_per_file=4, on_exceed="warn")
        with pytest.raises(OSError, match=r"resuming needs 1.22 MiB \(1,280,\d+ B\) free in .*/s' to cut "
                                          r"step_000000005.safetensors back to the checkpoint's step .*Free at least "
                                          r".* on that file system and resume again; nothing was touched"):
            trainer(tmp_path, [resumed], max_steps=12).fit(TinyLM(wide), token_loader(vocab=5000, n=400),
                                                           ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
        assert {n: os.path.getsize(disk / "s" / n) for n in _files(disk / "s")} == before
        (disk / "other.bin").unlink()
        with pytest.raises(OSError, match=r"no space left in .* for its lock file"):  # full to the last byte
            with open(disk / "other.bin", "wb") as fh:
                try:
                    fh.write(b"\0" * (16 << 20))
                except OSError:
                    pass
            trainer(tmp_path, [BudgetCallback(disk / "s2")], max_steps=2).fit(TinyLM(wide), token_loader(vocab=5000))
