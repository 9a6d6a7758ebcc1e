import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from budget_callback import BudgetCallback, BudgetExceededError, SnapshotReader
from budget_callback.shapes import ModelShape
from helpers import LensLM, TinyLM, token_loader, trainer


class RecordW(Callback):
    """Keeps the model's W (as (V, D)) after every optimizer step, for comparison."""

    def __init__(self, get):
        self.get, self.seen, self.last = get, {}, -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            self.seen[trainer.global_step] = self.get(pl_module).detach().clone()


def _files(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))


def test_tied_gpt_snapshots_exact_and_equal_to_model(tmp_path):
    cb = BudgetCallback(tmp_path / "snaps", snapshot_dtype="float32")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    trainer(tmp_path, [cb, rec], max_steps=5).fit(TinyLM(), token_loader())
    assert cb.bytes_written == cb.projected_bytes > 0
    assert cb.bytes_written == sum(os.path.getsize(tmp_path / "snaps" / f) for f in _files(tmp_path / "snaps"))
    reader = SnapshotReader(tmp_path / "snaps")
    assert reader.steps == [1, 2, 3, 4, 5] and len(reader) == 5
    for step in reader.steps:
        assert torch.equal(reader.load(step), rec.seen[step])
    assert cb.forecast.to_dict()["storage"]["snapshot_bytes"] == cb.projected_bytes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("per_file, every, steps", [(1, 1, 7), (3, 1, 7), (4, 2, 9), (2, 3, 5)])
def test_bytes_written_equals_projected(tmp_path, dtype, per_file, every, steps):
    cb = BudgetCallback(tmp_path / "s", save_every_n_steps=every, snapshot_dtype=dtype, snapshots_per_file=per_file)
    rec = RecordW(lambda m: m.model.lm_head.weight)
    trainer(tmp_path, [cb, rec], max_steps=steps).fit(TinyLM(), token_loader())
    assert cb.bytes_written == cb.projected_bytes
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == list(range(every, steps + 1, every))
    for step in reader.steps:
        stored = reader.load(step)
        assert stored.dtype == getattr(torch, dtype) and stored.shape == (50, 8)
        assert torch.equal(stored, rec.seen[step].to(getattr(torch, dtype)))
    traj = reader.trajectory(7)
    assert traj.shape == (len(reader.steps), 8)
    assert torch.equal(traj[-1], reader.load(reader.steps[-1])[7])


def test_untied_gpt_with_embedding(tmp_path):
    shape = ModelShape(vocab_size=30, d_model=4, n_layer=1, n_head=1, n_ctx=8, tied=False)
    cb = BudgetCallback(tmp_path / "s", include_embedding=True, snapshot_dtype="float32", snapshots_per_file=2)
    rec_w = RecordW(lambda m: m.model.lm_head.weight)
    rec_e = RecordW(lambda m: m.model.wte.weight)
    trainer(tmp_path, [cb, rec_w, rec_e], max_steps=3).fit(TinyLM(shape), token_loader(vocab=30))
    assert cb.bytes_written == cb.projected_bytes
    reader = SnapshotReader(tmp_path / "s")
    assert torch.equal(reader.load(3, "embedding"), rec_e.seen[3])
    assert torch.equal(reader.load(3), rec_w.seen[3])
    assert not torch.equal(reader.load(3, "embedding"), reader.load(3))
    assert reader.trajectory(2, name="embedding").shape == (3, 4)


def test_tied_embedding_stored_once(tmp_path):
    cb = BudgetCallback(tmp_path / "s", include_embedding=True)
    trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(), token_loader())
    reader = SnapshotReader(tmp_path / "s")
    assert torch.equal(reader.load(2, "embedding"), reader.load(2))
    assert cb.bytes_written == cb.projected_bytes


def test_transformerlens_w_u_is_transposed_and_traced(tmp_path):
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    rec = RecordW(lambda m: m.W_U.t())
    trainer(tmp_path, [cb, rec], max_steps=3).fit(LensLM(), token_loader(vocab=40))
    reader = SnapshotReader(tmp_path / "s")
    assert reader.load(3).shape == (40, 6)
    assert torch.equal(reader.load(3), rec.seen[3])
    assert "traced" in cb.forecast.memory["activations_method"]
    assert cb.forecast.memory["activations_bytes"] > 0 or cb.forecast.memory["peak_phase"] == "optimizer_step"
    assert cb.bytes_written == cb.projected_bytes


def test_unembedding_by_name_and_callable(tmp_path):
    cb = BudgetCallback(tmp_path / "a", unembedding="mix.weight", snapshot_dtype="float32")
    trainer(tmp_path, [cb], max_steps=1).fit(LensLM(), token_loader(vocab=40))
    assert SnapshotReader(tmp_path / "a").load(1).shape == (6, 6)
    cb = BudgetCallback(tmp_path / "b", unembedding=lambda m: m.W_U.t() * 1, snapshot_dtype="float32")
    trainer(tmp_path, [cb], max_steps=1).fit(LensLM(), token_loader(vocab=40))
    assert SnapshotReader(tmp_path / "b").load(1).shape == (40, 6)


def test_unembedding_not_found_lists_what_was_tried(tmp_path):
    import lightning as L

    class NoHead(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, i):
            return self.layer(batch[0].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = BudgetCallback(tmp_path / "s")
    with pytest.raises(ValueError, match="lm_head.weight.*unembedding="):
        trainer(tmp_path, [cb], max_steps=1).fit(NoHead(), token_loader())
    assert not (tmp_path / "s").exists() or _files(tmp_path / "s") == []
    with pytest.raises(ValueError, match="not found"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "t", unembedding="nope.weight")], max_steps=1).fit(
            TinyLM(), token_loader())


def test_downsample_picks_smallest_fitting_interval(tmp_path):
    probe = BudgetCallback(tmp_path / "probe")
    trainer(tmp_path, [probe], max_steps=20).fit(TinyLM(), token_loader(n=200))
    layout = probe._layout
    budget = layout.series_bytes(20, 1) // 3
    cb = BudgetCallback(tmp_path / "s", disk_budget=budget)
    trainer(tmp_path, [cb], max_steps=20).fit(TinyLM(), token_loader(n=200))
    k = cb.save_every_n_steps
    assert k > 1 and layout.series_bytes(20, k) <= budget < layout.series_bytes(20, k - 1)
    assert cb.bytes_written == cb.projected_bytes <= budget
    assert SnapshotReader(tmp_path / "s").steps == list(range(k, 21, k))
    assert cb.forecast.decision == "downsampled"


def test_abort_raises_before_first_step_and_writes_nothing(tmp_path):
    cb = BudgetCallback(tmp_path / "s", disk_budget=100, on_exceed="abort")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    with pytest.raises(BudgetExceededError, match="disk"):
        trainer(tmp_path, [cb, rec], max_steps=5).fit(TinyLM(), token_loader())
    assert rec.seen == {}
    assert not (tmp_path / "s").exists() or os.listdir(tmp_path / "s") == []


def test_downsample_aborts_when_not_even_one_snapshot_fits(tmp_path):
    cb = BudgetCallback(tmp_path / "s", disk_budget=100)
    with pytest.raises(BudgetExceededError, match="not even one snapshot"):
        trainer(tmp_path, [cb], max_steps=5).fit(TinyLM(), token_loader())
    assert not (tmp_path / "s").exists() or os.listdir(tmp_path / "s") == []


def test_memory_budget_abort_names_largest_batch(tmp_path):
    cb = BudgetCallback(tmp_path / "s", memory_budget="40KB")
    with pytest.raises(BudgetExceededError, match="memory"):
        trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(), token_loader())


def test_warn_proceeds(tmp_path):
    cb = BudgetCallback(tmp_path / "s", disk_budget=100, on_exceed="warn")
    with pytest.warns(UserWarning, match="disk"):
        trainer(tmp_path, [cb], max_steps=3).fit(TinyLM(), token_loader())
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3]
    assert cb.save_every_n_steps == 1


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cb = BudgetCallback(tmp_path / "s", save_every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=6, accumulate_grad_batches=3).fit(TinyLM(), token_loader(n=100))
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6]
    assert cb.forecast.inputs.setup.grad_accum == 3
    assert cb.bytes_written == cb.projected_bytes


def test_max_epochs_counts_stepping_batches(tmp_path):
    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=-1, max_epochs=2).fit(TinyLM(), token_loader(n=16, batch=4))
    assert SnapshotReader(tmp_path / "s").steps == list(range(1, 9))
    assert cb.forecast.inputs.steps == 8


def test_metrics_reach_csv_logger(tmp_path):
    import csv

    cb = BudgetCallback(tmp_path / "s")
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=4, logger=logger, log_every_n_steps=2).fit(TinyLM(), token_loader())
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    disk = [r for r in rows if r.get("budget/disk_actual_bytes")]
    assert disk, "budget metrics missing from the CSV logger"
    last = disk[-1]
    assert int(float(last["budget/disk_actual_bytes"])) == cb.bytes_written
    assert int(float(last["budget/disk_projected_bytes"])) == cb.projected_bytes
    assert int(float(last["budget/save_every_n_steps"])) == 1
    assert float(last["budget/step_seconds"]) > 0


def test_resume_continues_series_without_gaps_or_duplicates(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = BudgetCallback(tmp_path / "s", save_every_n_steps=2, disk_budget=None)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path, [first, ckpt], max_steps=6, enable_checkpointing=True).fit(TinyLM(), token_loader(n=100))
    # the run went on to step 6 after the step-4 checkpoint: as if it crashed there
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6]
    second = BudgetCallback(tmp_path / "s", save_every_n_steps=1)  # requested interval differs: restored wins
    rec = RecordW(lambda m: m.model.lm_head.weight)
    path = str(next(p for p in ckpt_dir.iterdir() if "step=4" in p.name))
    trainer(tmp_path, [second, rec, ModelCheckpoint(dirpath=ckpt_dir)], max_steps=10,
            enable_checkpointing=True).fit(TinyLM(), token_loader(n=100), ckpt_path=path)
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == [2, 4, 6, 8, 10]
    assert second.save_every_n_steps == 2
    assert torch.equal(reader.load(6), rec.seen[6].to(torch.bfloat16))  # the resumed run's step 6, not the old one
    assert second.bytes_written == sum(os.path.getsize(tmp_path / "s" / f) for f in _files(tmp_path / "s"))


def test_existing_snapshots_are_not_overwritten_silently(tmp_path):
    trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=2).fit(TinyLM(), token_loader())
    with pytest.raises(ValueError, match="already holds snapshots"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=2).fit(TinyLM(), token_loader())
    cb = BudgetCallback(tmp_path / "s", overwrite=True, save_every_n_steps=2)
    trainer(tmp_path, [cb], max_steps=4).fit(TinyLM(), token_loader())
    assert SnapshotReader(tmp_path / "s").steps == [2, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"save_every_n_steps": 0}, "`save_every_n_steps`"), ({"save_every_n_steps": -2}, "`save_every_n_steps`"),
     ({"snapshot_dtype": "int8"}, "`snapshot_dtype`"), ({"disk_budget": "12XB"}, "`disk_budget`"),
     ({"disk_budget": 0}, "`disk_budget`"), ({"memory_budget": "lots"}, "`memory_budget`"),
     ({"wandb_budget": -1}, "`wandb_budget`"), ({"on_exceed": "explode"}, "`on_exceed`"),
     ({"snapshots_per_file": 0}, "`snapshots_per_file`"), ({"unembedding": 3}, "`unembedding`"),
     ({"snapshot_dir": ""}, "`snapshot_dir`"), ({"when_behind": "panic"}, "`when_behind`")],
)
def test_constructor_validation_names_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetCallback(**kwargs)


def test_snapshot_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "file")], max_steps=1).fit(TinyLM(), token_loader())


def test_unembedding_name_not_2d(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "s", unembedding="mix.bias")], max_steps=1).fit(
            LensLM(), token_loader(vocab=40))


def test_untraceable_module_still_runs_and_says_so(tmp_path):
    class Untraceable(LensLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if loss.item() > 1e9:  # data-dependent Python control flow: cannot run on fake tensors
                raise AssertionError
            return loss

    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=2).fit(Untraceable(), token_loader(vocab=40))
    memory = cb.forecast.memory
    assert memory["activations_method"].startswith("not traced")
    assert memory["activations_bytes"] == 0
    n = sum(p.numel() for p in Untraceable().parameters())
    assert memory["phases"]["optimizer_step"]["total"] == 4 * n * 4  # fp32 params, grads, two AdamW moments
    assert SnapshotReader(tmp_path / "s").steps == [1, 2]


def test_accelerator_memory_metrics(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's peak-memory probe is mocked (the one thing that cannot exist on this machine)."""
    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(), token_loader())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123_456)
    cb._on_accelerator = True
    fake_trainer = type("FakeTrainer", (), {"log_every_n_steps": 1, "world_size": 1})()
    metrics = cb._metrics(fake_trainer, 2)
    assert metrics["budget/memory_projected_bytes"] == cb.forecast.memory["peak_bytes"]
    assert metrics["budget/memory_actual_bytes"] == 123_456


def test_checkpoints_do_not_split_stacked_files(tmp_path):
    """Before each checkpoint the open stack is written durably, then rewritten in place as it fills."""
    cb = BudgetCallback(tmp_path / "s", snapshots_per_file=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path, [cb, ckpt], max_steps=10, enable_checkpointing=True).fit(TinyLM(), token_loader(n=100))
    assert cb.bytes_written == cb.projected_bytes
    assert _files(tmp_path / "s") == ["step_000000001.safetensors", "step_000000005.safetensors",
                                      "step_000000009.safetensors"]
    assert SnapshotReader(tmp_path / "s").steps == list(range(1, 11))


def test_resume_mid_stack_cuts_the_stacked_file(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    first = BudgetCallback(tmp_path / "s", snapshots_per_file=4, snapshot_dtype="float32")
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1)
    trainer(tmp_path, [first, ckpt], max_steps=10, enable_checkpointing=True).fit(TinyLM(), token_loader(n=100))
    second = BudgetCallback(tmp_path / "s", snapshots_per_file=4, snapshot_dtype="float32")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    path = str(next(p for p in ckpt_dir.iterdir() if "step=6" in p.name))
    trainer(tmp_path, [second, rec], max_steps=12).fit(TinyLM(), token_loader(n=100), ckpt_path=path)
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == list(range(1, 13))
    for step in (7, 10, 12):  # written by the resumed run
        assert torch.equal(reader.load(step), rec.seen[step])
    assert second.bytes_written == sum(os.path.getsize(tmp_path / "s" / f) for f in _files(tmp_path / "s"))
