"""BudgetCallback in real Trainer runs: exact snapshots of W for models of several shapes, budgets, steps, logging."""

import csv
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from budget_callback import BudgetCallback, BudgetExceededError, SnapshotReader
from budget_callback.forecast.shapes import ModelShape
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.schedule import series_bytes
from helpers import LensLM, LlamaLM, TinyLM, TwoOptimizerLM, stall_first_write, token_loader, trainer


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


def _on_disk(path):
    return sum(os.path.getsize(path / f) for f in _files(path))


def test_tied_gpt_snapshots_exact_and_equal_to_model(tmp_path):
    cb = BudgetCallback(tmp_path / "snaps", snapshot_dtype="float32")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    trainer(tmp_path, [cb, rec], max_steps=5).fit(TinyLM(), token_loader())
    assert cb.bytes_written == cb.projected_bytes == _on_disk(tmp_path / "snaps") > 0
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
    assert cb.bytes_written == cb.projected_bytes == _on_disk(tmp_path / "s")
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
    assert cb.forecast.memory["activations_method"] == "traced training step (fake tensors, cpu fake device, Lightning's step order)"
    assert cb.forecast.memory["phases"]["forward_backward"]["activations"] > 0
    assert cb.bytes_written == cb.projected_bytes


@pytest.mark.parametrize("head", ["output", "decoder", "to_logits"])
def test_llama_style_untied_head_of_any_name(tmp_path, head):
    """GQA, RMSNorm, SwiGLU, torch.optim.AdamW, untied head called output / decoder / anything."""
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", include_embedding=True)
    rec = RecordW(lambda m: getattr(m, head).weight)
    rec_e = RecordW(lambda m: m.tok_embeddings.weight)
    trainer(tmp_path, [cb, rec, rec_e], max_steps=3).fit(LlamaLM(head=head), token_loader(vocab=64))
    reader = SnapshotReader(tmp_path / "s")
    assert torch.equal(reader.load(3), rec.seen[3]) and torch.equal(reader.load(3, "embedding"), rec_e.seen[3])
    assert cb.bytes_written == cb.projected_bytes == _on_disk(tmp_path / "s")


class ManualLens(LensLM):
    """A module that declares no shape (traced), with two optimizers stepped by hand."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            logits = torch.tanh(self.mix(self.W_E[x])) @ self.W_U
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.AdamW([self.W_E, self.W_U], lr=1e-2), torch.optim.SGD(self.mix.parameters(), lr=0.1)


def test_traced_forecast_of_a_module_that_declares_no_shape(tmp_path):
    """What was found, not a placeholder; the largest micro-batch and fewest devices from two traces."""
    cb = BudgetCallback(tmp_path / "s", memory_budget="64MiB")
    trainer(tmp_path, [cb], max_steps=2).fit(LlamaLM(), token_loader(vocab=64))
    f = cb.forecast
    model = f.to_dict()["model"]
    assert model == {"name": "LlamaLM", "declared": False, "parameters": sum(p.numel() for p in LlamaLM().parameters()),
                     "tensors": 17, "layers": 2, "layer_params": 3104, "tied": False, "vocab_size": 64, "hidden_dim": 16,
                     "written_in_step": []}
    from budget_callback.forecast.report import render
    head = render(f).splitlines()[0]
    assert head.startswith("LlamaLM (traced): 8,272 parameters in 17 tensors, 2 layers, W 64 x 16 untied;")
    assert "single device (forecast as ddp)" in head and "V=" not in head
    mem = f.memory
    assert mem["max_batch_size"] > 4 and mem["min_devices"] == 1
    from budget_callback.forecast.memory import peak_memory_from_trace
    from budget_callback.lightning.tracing import trace_training_step_memory
    assert mem["trace_per_sample"]["forward_peak_bytes"] > 0  # activations grow with the batch
    model, setup = LlamaLM(), f.inputs.setup

    def traced_peak(b):  # the step itself traced at micro-batch b, not the line's guess
        x = torch.randint(0, 64, (b, 8))
        return peak_memory_from_trace(trace_training_step_memory(
            model, (x, x), lambda m, batch: m.training_step(batch, 0), optimizer=model.configure_optimizers()),
            setup)["peak_bytes"]
    assert traced_peak(mem["max_batch_size"]) <= 64 * 2**20 < traced_peak(mem["max_batch_size"] + 1)


def test_manual_optimization_of_a_traced_module(tmp_path):
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    rec = RecordW(lambda m: m.W_U.t())
    trainer(tmp_path, [cb, rec], max_steps=6).fit(ManualLens(), token_loader(vocab=40))
    assert cb.forecast.memory["activations_method"] == "traced training step (fake tensors, cpu fake device, Lightning's step order)"
    assert cb.forecast.memory["activations_bytes"] > 0  # manual: the whole step is one phase
    assert SnapshotReader(tmp_path / "s").steps == [2, 4, 6]
    assert cb.bytes_written == cb.projected_bytes


def test_unembedding_by_name_and_callable(tmp_path):
    cb = BudgetCallback(tmp_path / "a", unembedding="mix.weight", snapshot_dtype="float32")
    trainer(tmp_path, [cb], max_steps=1).fit(LensLM(), token_loader(vocab=40))
    assert SnapshotReader(tmp_path / "a").load(1).shape == (6, 6)
    cb = BudgetCallback(tmp_path / "b", unembedding=lambda m: m.W_U.t() * 1, snapshot_dtype="float32")
    trainer(tmp_path, [cb], max_steps=1).fit(LensLM(), token_loader(vocab=40))
    assert SnapshotReader(tmp_path / "b").load(1).shape == (40, 6)


def test_unembedding_not_found_lists_what_was_tried(tmp_path):
    class NoHead(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, i):
            return self.layer(batch[0].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="lm_head.weight.*unembedding="):
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=1).fit(NoHead(), token_loader())
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="not found"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "t", unembedding="nope.weight")], max_steps=1).fit(
            TinyLM(), token_loader())


def test_unembedding_name_not_2d(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "s", unembedding="mix.bias")], max_steps=1).fit(
            LensLM(), token_loader(vocab=40))


# --- budgets ------------------------------------------------------------------------------------------
LAYOUT = SnapshotLayout(50, 8, "bfloat16")


def test_downsample_picks_smallest_fitting_interval_and_says_so(tmp_path):
    budget = series_bytes(LAYOUT, 20, 1) // 3
    cb = BudgetCallback(tmp_path / "s", disk_budget=budget)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_steps=20, logger=logger).fit(TinyLM(), token_loader(n=200))
    k = cb.save_every_n_steps
    assert k > 1 and series_bytes(LAYOUT, 20, k) <= budget < series_bytes(LAYOUT, 20, k - 1)
    assert cb.bytes_written == cb.projected_bytes <= budget
    assert SnapshotReader(tmp_path / "s").steps == list(range(k, 21, k))
    assert cb.forecast.decision == "downsampled"
    assert [e for e in cb.events if e["event"] == "interval_raised_at_start"] == [
        {"step": 0, "event": "interval_raised_at_start", "from": 1, "every": k}]
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    assert int(float(next(r for r in rows if r.get("budget/events"))["budget/events"])) == 1


def test_abort_raises_before_first_step_and_writes_nothing(tmp_path):
    cb = BudgetCallback(tmp_path / "s", disk_budget=100, on_exceed="abort")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    with pytest.raises(BudgetExceededError, match="disk"):
        trainer(tmp_path, [cb, rec], max_steps=5).fit(TinyLM(), token_loader())
    assert rec.seen == {}
    assert not (tmp_path / "s").exists()  # the lock's directory is removed with the lock


def test_downsample_aborts_when_not_even_one_snapshot_fits(tmp_path):
    cb = BudgetCallback(tmp_path / "s", disk_budget=100)
    with pytest.raises(BudgetExceededError, match="not even one snapshot"):
        trainer(tmp_path, [cb], max_steps=5).fit(TinyLM(), token_loader())
    assert not (tmp_path / "s").exists()


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


def test_snapshot_buffers_that_cannot_fit_host_ram_are_refused(tmp_path):
    """snapshots_per_file=10**6 of a 640 kB W needs 640 GB of host RAM: refused before anything is written."""
    wide = ModelShape(vocab_size=5000, d_model=64, n_layer=1, n_head=2, n_ctx=8)
    cb = BudgetCallback(tmp_path / "s", snapshots_per_file=10**6)
    with pytest.raises(ValueError, match=r"`snapshots_per_file`=1000000 .* of host RAM"):
        trainer(tmp_path, [cb], max_steps=2).fit(TinyLM(wide), token_loader(vocab=5000))
    assert not (tmp_path / "s").exists()


def test_snapshot_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "file")], max_steps=1).fit(TinyLM(), token_loader())


# --- optimizer steps ------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("every, per_file, max_steps, max_epochs, steps", [
    (3, 1, 9, -1, [4, 6, 10]),  # global_step 2, 4, ..., 10: the first batch end at or past 3, 6, 9
    (1, 1, 6, -1, [2, 4, 6]),
    (3, 2, 12, -1, [4, 6, 10, 12]),  # stacked: explicit steps in the file, exact bytes
    (2, 1, -1, 1, [2, 4, 6, 8, 10, 12, 14, 16]),  # 8 batches x 2 optimizers
])
def test_manual_optimization_with_two_optimizers(tmp_path, every, per_file, max_steps, max_epochs, steps, record):
    """global_step advances by 2 per batch; the forecast counts the same snapshots and bytes as are written."""
    cb = BudgetCallback(tmp_path / "s", save_every_n_steps=every, snapshots_per_file=per_file, snapshot_dtype="float32")
    rec = RecordW(lambda m: m.model.lm_head.weight)
    trainer(tmp_path, [cb, rec], max_steps=max_steps, max_epochs=max_epochs).fit(
        TwoOptimizerLM(), token_loader(n=32, batch=4))
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == steps
    assert cb.forecast.storage["snapshot_count"] == len(steps)
    assert cb.forecast.storage["snapshot_bytes"] == cb.projected_bytes == cb.bytes_written == _on_disk(tmp_path / "s")
    for step in steps:
        assert torch.equal(reader.load(step), rec.seen[step])
    record(every=every, per_file=per_file, steps=steps, bytes=cb.bytes_written)


class Tokens(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(16):
            x = torch.randint(0, 50, (9,), generator=g)
            yield x[:-1], x[1:]


def test_iterable_dataset_with_max_epochs_says_to_set_max_steps(tmp_path):
    cb = BudgetCallback(tmp_path / "s")
    with pytest.raises(ValueError, match="set `max_steps`"):
        trainer(tmp_path, [cb], max_steps=-1, max_epochs=1).fit(TinyLM(), DataLoader(Tokens(), batch_size=4))
    cb = BudgetCallback(tmp_path / "t")
    trainer(tmp_path, [cb], max_steps=3).fit(TinyLM(), DataLoader(Tokens(), batch_size=4))
    assert SnapshotReader(tmp_path / "t").steps == [1, 2, 3]


# --- logging ---------------------------------------------------------------------------------------------
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


def test_snapshot_of_step_s_is_w_after_step_s_with_a_slow_writer_and_a_fast_model(tmp_path, monkeypatch):
    """The copy runs off the training thread; the next optimizer step waits only until it has read W.
    The disk is held until training has waited for a buffer (event-driven), so copies, queue and
    optimizer steps all overlap."""
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", queue_depth=2)
    stall_first_write(monkeypatch, lambda: cb._fit.capture.stats.waits >= 1)  # until training found every buffer taken

    class BeforeNextStep(Callback):
        """W after step s, read when step s + 1 is about to change it (a hook the copy may overlap)."""

        def __init__(self):
            self.seen = {}

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.seen[trainer.global_step] = module.model.lm_head.weight.detach().clone()

        def on_train_end(self, trainer, module):
            self.seen[trainer.global_step] = module.model.lm_head.weight.detach().clone()

    rec = BeforeNextStep()
    trainer(tmp_path, [cb, rec], max_steps=12).fit(TinyLM(), token_loader(n=100))
    reader = SnapshotReader(tmp_path / "s")
    capture = cb._fit.capture
    assert capture.overlap and capture.stats.torn == 0 and capture.stats.path == "cpu copier"  # overlapped the next step
    assert reader.steps == list(range(1, 13)) and capture.stats.waits >= 1
    for step in reader.steps:
        assert torch.equal(reader.load(step), rec.seen[step])


def test_host_ram_forecast_is_the_ring_the_capture_allocates(tmp_path):
    cb = BudgetCallback(tmp_path / "s", queue_depth=3, include_embedding=True)
    shape = ModelShape(vocab_size=30, d_model=4, n_layer=1, n_head=1, n_ctx=8, tied=False)
    trainer(tmp_path, [cb], max_steps=3).fit(TinyLM(shape), token_loader(vocab=30))
    # grown on demand up to the ring the forecast counts (one page-aligned file image each)
    assert cb.forecast.storage["host_buffer_bytes"] == (3 + 2) * 4096
    assert 4096 <= cb._fit.capture.host_bytes <= cb.forecast.storage["host_buffer_bytes"]


def test_a_host_ram_share_caps_the_ring_the_capture_allocates_and_every_file_stays_exact(tmp_path, monkeypatch):
    """A host with little RAM available (the figure is given): the forecast caps the ring at the file images that
    fit in 25% of it, 4 of queue_depth 6 + 2 = 8, and says so; the capture never holds more, however far the
    measured pace would let it grow (here: as far as it may) while the disk stalls: training waits, and every
    file is the exact safetensors bytes of W after its step. The manifest says what the fit used."""
    import json

    import budget_callback.lightning.capture as capture_module
    import budget_callback.lightning.session as session_module
    from budget_callback.snapshots.format import encode_header, image_bytes

    layout = SnapshotLayout(30, 4, "float32")
    image = image_bytes(layout)
    monkeypatch.setattr(session_module, "available_ram_bytes", lambda: 16 * image + 100)
    monkeypatch.setattr(capture_module, "ring_buffers", lambda writes, intervals, cap: (cap, "the test's pace"))
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32", queue_depth=6)
    stall_first_write(monkeypatch, lambda: cb._fit.capture.stats.waits >= 1)  # until every buffer is taken

    class AfterEachStep(Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seen[trainer.global_step] = module.model.lm_head.weight.detach().clone()

    rec = AfterEachStep()
    shape = ModelShape(vocab_size=30, d_model=4, n_layer=1, n_head=1, n_ctx=8, tied=False)
    trainer(tmp_path, [cb, rec], max_steps=12).fit(TinyLM(shape), token_loader(vocab=30, n=100))
    st, stats = cb.forecast.storage, cb._fit.capture.stats
    assert (st["host_buffer_images"], st["host_buffer_bytes"], st["host_ram_available_bytes"]) == \
        (4, 4 * image, 16 * image + 100)
    assert st["host_buffer_basis"].startswith("4 file images: as many as fit in 25% of the")
    assert stats.waits >= 1 and stats.ring_buffers == 4 and cb._fit.capture.host_bytes == 4 * image
    for step in range(1, 13):
        data = (tmp_path / "s" / f"step_{step:09d}.safetensors").read_bytes()
        header = encode_header(layout.tensors(1), layout.metadata(step, 1, 1))
        assert data == header + rec.seen[step].numpy().tobytes()
    assert cb.bytes_written == cb.projected_bytes
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    used = manifest["snapshot_ring"]
    assert (used["cap_buffers"], used["buffers"], used["bytes"], used["basis"]) == \
        (4, 4, 4 * image, st["host_buffer_basis"])
    capped = [e for e in manifest["events"] if e["event"] == "snapshot_ring_capped"]
    assert [(e["buffers"], e["bytes"]) for e in capped] == [(4, 4 * image)]
