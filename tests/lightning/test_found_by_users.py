"""Faults a user trying the callback found (each test failed before its fix): the callback must not change
what trains, must not write a torn W, must not break a compiled run, must say what it does not know."""

import os

import lightning
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from budget_callback import BudgetCallback, BudgetExceededError, SnapshotReader
from budget_callback.forecast.report import render
from helpers import LensLM, tmpfs, token_loader, trainer


class Head(L.LightningModule):
    """An LM head called ``decoder`` next to an RLHF-style value head (a (1, D) ``head``)."""

    def __init__(self, V=50, D=8, hook=False):
        super().__init__()
        self.emb, self.decoder = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.value = nn.Module()
        self.value.head = nn.Linear(D, 1)
        self.hook, self.V = hook, V

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.emb(x))
        return nn.functional.cross_entropy(self.decoder(h).reshape(-1, self.V), y.reshape(-1)) + \
            self.value.head(h).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.hook:  # a max-norm constraint on the output rows, after every step
            with torch.no_grad():
                self.decoder.weight.mul_(0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AtBatchEnd(Callback):
    def __init__(self):
        self.w = {}

    def on_train_batch_end(self, trainer, module, *args):
        self.w[trainer.global_step] = module.decoder.weight.detach().clone()


def test_the_lm_head_over_the_vocabulary_not_a_value_head(tmp_path):
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    rec = AtBatchEnd()
    trainer(tmp_path, [cb, rec], max_steps=2).fit(Head(), token_loader())
    assert torch.equal(SnapshotReader(tmp_path / "s").load(2), rec.w[2])


@pytest.mark.parametrize("who", ["module hook", pytest.param("weight averaging", marks=pytest.mark.skipif(
    not hasattr(lightning.pytorch.callbacks, "EMAWeightAveraging"),
    reason=f"EMAWeightAveraging is new in Lightning 2.6 (this is {lightning.__version__})"))])
def test_w_changed_after_the_step_is_never_torn_into_a_snapshot(tmp_path, who):
    """The module's own on_train_batch_end halves W; EMAWeightAveraging swaps weights in for validation.
    The snapshot of step s is W as the callback saw it at the end of step s, whole."""
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    rec = AtBatchEnd()
    callbacks, kwargs = [cb, rec], {}
    if who == "weight averaging":
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=0.0001))
        kwargs = dict(val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0)
    V = 4000
    loader = token_loader(vocab=V, n=64, batch=4)
    trainer(tmp_path, callbacks, max_steps=6, **kwargs).fit(Head(V=V, D=64, hook=who == "module hook"), loader,
                                                            loader if kwargs else None)
    reader = SnapshotReader(tmp_path / "s")
    assert reader.steps == [1, 2, 3, 4, 5, 6]
    for step in reader.steps:
        assert torch.equal(reader.load(step), rec.w[step])
    assert any(e["event"] == "copy_guarded" for e in cb.events) and cb._fit.capture.stats.path == "cpu guarded"


class WritesInStep(Head):
    """Changes W in place at the start of its training step (manual decay, a norm constraint), between a
    snapshot and the next optimizer step, through ``.data`` (which PyTorch's version counter does not see)
    or a plain in-place op under no_grad. Records W after each step as it found it."""

    def __init__(self, how, traceable):
        super().__init__(V=4000, D=64)
        self.how, self.traceable, self.w = how, traceable, {}

    def training_step(self, batch, batch_idx):
        if not self.traceable:
            assert bool(batch[0].sum() >= 0)  # asks about the data: the fit-start trace cannot follow this step
        self.w[self.global_step] = self.decoder.weight.detach().clone()  # W after the previous step
        with torch.no_grad():
            (self.decoder.weight.data if self.how == "data" else self.decoder.weight).mul_(0.5)
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        self.w[self.global_step] = self.decoder.weight.detach().clone()

    on_train_batch_end = L.LightningModule.on_train_batch_end  # no hook between the steps: copies overlap


@pytest.mark.parametrize("how", ["data", "plain"])
@pytest.mark.parametrize("traceable", [True, False], ids=["traced", "untraced"])
def test_w_changed_in_the_training_step_is_never_torn_into_a_snapshot(tmp_path, how, traceable):
    """The overlapped copy of step s runs while step s+1's training step starts: a W it changes in place
    must never be written as the snapshot of step s. A traced step that does it starts guarded (nothing
    dropped); otherwise the change is caught before the copy is written (dropped, counted, then guarded)."""
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    model = WritesInStep(how, traceable)
    trainer(tmp_path, [cb], max_steps=6).fit(model, token_loader(vocab=4000, n=64, batch=4))
    reader = SnapshotReader(tmp_path / "s")
    for step in reader.steps:
        assert torch.equal(reader.load(step), model.w[step]), f"snapshot {step} is not W after step {step}"
    events = [e["event"] for e in cb.events]
    if traceable:
        assert reader.steps == [1, 2, 3, 4, 5, 6] and cb.series.dropped == 0
        guarded = next(e for e in cb.events if e["event"] == "copy_guarded")
        assert "training_step writes unembedding in place" in guarded["reason"]
        assert cb.forecast.model["written_in_step"] == ["unembedding"]
    else:
        assert cb.series.dropped >= 1 and "dropped" in events and len(reader.steps) == 6 - cb.series.dropped
        assert reader.steps[-1] == 6  # guarded after the first catch: the rest are all written
    assert cb.bytes_written == sum(f.stat().st_size for f in (tmp_path / "s").glob("*.safetensors"))


def test_a_step_that_leaves_w_alone_is_not_guarded(tmp_path):
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    trainer(tmp_path, [cb], max_steps=3).fit(Head(), token_loader())
    assert cb.forecast.model["written_in_step"] == [] and cb.series.dropped == 0
    assert not any("training_step" in e.get("reason", "") for e in cb.events)


def test_a_compiled_module_compiles_as_it_would_without_the_callback(tmp_path):
    """trainer.fit(torch.compile(model)): the trace used to run the user's compiled step under fake tensors
    (dynamo compiled it there; the process could crash at exit)."""
    import torch._dynamo

    class Plain(LensLM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = torch.tanh(self.mix(self.W_E[x])) @ self.W_U
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    frames = {}
    for with_cb in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = Plain()
        cbs = [BudgetCallback(tmp_path / "s", snapshot_dtype="float32")] if with_cb else []
        trainer(tmp_path, cbs, max_steps=3).fit(torch.compile(model), token_loader(vocab=40))
        frames[with_cb] = dict(torch._dynamo.utils.counters["frames"])
    assert frames[True] == frames[False] and frames[True].get("ok", 0) >= 1
    assert torch.equal(SnapshotReader(tmp_path / "s").load(3), model.W_U.detach().t())
    from budget_callback.lightning.torch_internals import compiled_trace_unsupported

    why = compiled_trace_unsupported()  # torch < 2.11: forecast as eager, and the report says why
    assert cbs[0].forecast.memory["mode"] == ("eager" if why else "compiled")  # not run by dynamo
    assert not why or any(why in n for n in cbs[0].forecast.notes)


def test_the_callback_does_not_change_what_trains(tmp_path):
    """It used to draw a batch at train start: one more draw of the global RNG (a shuffling sampler)."""
    final = {}
    for with_cb in (False, True):
        torch.manual_seed(0)
        model = Head()
        data = torch.randint(0, 50, (64, 9), generator=torch.Generator().manual_seed(1))
        loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4, shuffle=True)
        cbs = [BudgetCallback(tmp_path / f"s{with_cb}")] if with_cb else []
        trainer(tmp_path, cbs, max_steps=5).fit(model, loader)
        final[with_cb] = model.decoder.weight.detach().clone()
    assert torch.equal(final[True], final[False])


def test_a_stream_loses_no_batch(tmp_path):
    class Stream(IterableDataset):
        def __init__(self):
            self.items = iter(range(10**6))  # a stream: what is read is gone

        def __iter__(self):
            for i in self.items:
                yield torch.full((8,), i % 50), torch.full((8,), i % 50)

    class Seen(Head):
        def __init__(self):
            super().__init__()
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(int(batch[0][0, 0]))
            return super().training_step(batch, batch_idx)

    model = Seen()
    trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=3).fit(model, DataLoader(Stream(), batch_size=2))
    assert model.seen == [0, 2, 4]


def test_a_step_that_reads_a_value_is_traced_and_unknown_limits_say_so(tmp_path):
    class ItemLM(LensLM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = torch.tanh(self.mix(self.W_E[x])) @ self.W_U
            self.log("acc", (logits.argmax(-1) == y).float().mean().item())  # very common
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    cb = BudgetCallback(tmp_path / "a")
    trainer(tmp_path, [cb], max_steps=2).fit(ItemLM(), token_loader(vocab=40))
    assert cb.forecast.memory["activations_method"].startswith("traced")
    assert cb.forecast.memory["max_batch_size"] > 1

    class Branchy(LensLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if loss.item() > 1e9:  # data-dependent control flow: cannot be traced
                raise AssertionError
            return loss

    cb = BudgetCallback(tmp_path / "b")
    trainer(tmp_path, [cb], max_steps=2).fit(Branchy(), token_loader(vocab=40))
    assert "largest micro-batch and fewest devices unknown (the step could not be traced)" in render(cb.forecast)
    assert "largest micro-batch that fits none" not in render(cb.forecast)


def test_a_checkpoint_records_what_is_on_disk_then(tmp_path):
    """Lightning asks for the state before on_save_checkpoint: the flush must come first, or a snapshot lost
    before the checkpoint goes unnoticed on resume."""
    ckpt = ModelCheckpoint(tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [BudgetCallback(tmp_path / "s"), ckpt], max_steps=6, enable_checkpointing=True).fit(
        Head(), token_loader())
    state = next(v for k, v in torch.load(tmp_path / "ck" / "step=4.ckpt", weights_only=False)["callbacks"].items()
                 if k.startswith("BudgetCallback"))
    assert state["files_on_disk"] == 4
    os.remove(tmp_path / "s" / "step_000000002.safetensors")  # lost before the checkpoint
    with pytest.warns(UserWarning, match="some snapshots are missing"):
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], max_steps=8).fit(
            Head(), token_loader(), ckpt_path=str(tmp_path / "ck" / "step=4.ckpt"))


def test_stacked_files_rewritten_after_checkpoints_fit_a_tight_disk(tmp_path):
    """A checkpoint writes the open stacked file; growing it later needs old and new copy at once."""
    class Big(Head):
        def __init__(self):
            super().__init__(V=5000, D=64)

    with tmpfs(tmp_path / "disk", "2m") as disk:
        cb = BudgetCallback(disk / "snap", snapshots_per_file=3)
        ckpt = ModelCheckpoint(tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
        trainer(tmp_path, [cb, ckpt], max_steps=10, enable_checkpointing=True).fit(
            Big(), token_loader(vocab=5000))
        assert cb.series.lost == 0 and cb.bytes_written == cb.projected_bytes > 0
        assert cb.forecast.storage["rewrite_headroom_bytes"] > 0


# --- found by users, second pass: Trainer settings the callback must follow, figures that must stay honest ---
from helpers import TinyLM  # noqa: E402


def _snapshot_bytes_on_disk(directory):
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def test_double_precision_is_forecast_at_eight_bytes_a_parameter(tmp_path):
    """Trainer(precision="64-true") stopped at the first batch with an error phrased like a bad argument."""
    cb = BudgetCallback(tmp_path / "s", snapshot_dtype="float32")
    model = TinyLM(optimizer="sgd")
    trainer(tmp_path, [cb], max_steps=2, precision="64-true").fit(model, token_loader())
    n = sum(p.numel() for p in model.parameters())
    assert cb.forecast.inputs.setup.precision == "64-true" and cb.forecast.memory["params_bytes"] == 8 * n
    assert torch.equal(SnapshotReader(tmp_path / "s").load(2), model.model.lm_head.weight.detach().float())


def test_a_precision_plugin_the_tables_do_not_know_is_sized_by_the_parameters(tmp_path):
    from lightning.pytorch.plugins.precision import Precision

    class Custom(Precision):
        precision = "int8-simulated"  # a quantising plugin's own name

    cb = BudgetCallback(tmp_path / "s")
    trainer(tmp_path, [cb], max_steps=2, plugins=[Custom()]).fit(TinyLM(), token_loader())
    assert cb.forecast.inputs.setup.precision == "32-true"
    assert any("precision 'int8-simulated' has no table" in note for note in cb.forecast.notes)


def test_an_accumulation_schedule_is_counted_epoch_by_epoch(tmp_path):
    """GradientAccumulationScheduler({0: 4, 1: 1}): the forecast took epoch 0's accumulation for the whole run
    (8 steps of 20), so a budget that 20 snapshots do not fit passed at the start."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    cb = BudgetCallback(tmp_path / "s")
    t = trainer(tmp_path, [cb, GradientAccumulationScheduler({0: 4, 1: 1})], max_steps=-1, max_epochs=2)
    t.fit(TinyLM(), token_loader())  # 16 batches an epoch: 4 steps, then 16
    assert t.global_step == cb.forecast.inputs.steps == 20 and cb.forecast.storage["snapshot_count"] == 20
    assert cb.bytes_written == cb.projected_bytes == cb.forecast.storage["snapshot_bytes"]
    assert "ended early" not in cb.summary() and "past" not in cb.summary()

    budget = cb.forecast.storage["snapshot_bytes"] - 1  # 20 snapshots do not fit; 8 would
    cb = BudgetCallback(tmp_path / "t", disk_budget=budget, on_exceed="abort")
    with pytest.raises(BudgetExceededError):
        trainer(tmp_path, [cb, GradientAccumulationScheduler({0: 4, 1: 1})], max_steps=-1, max_epochs=2).fit(
            TinyLM(), token_loader())
    assert not (tmp_path / "t").exists()


def test_accumulation_rounds_up_in_every_epoch(tmp_path):
    """10 batches an epoch accumulated by 4 step at batches 4, 8 and 10 (the epoch's end): 6 steps in 2 epochs."""
    cb = BudgetCallback(tmp_path / "s")
    t = trainer(tmp_path, [cb], max_steps=-1, max_epochs=2, accumulate_grad_batches=4, limit_train_batches=10)
    t.fit(TinyLM(), token_loader())
    assert t.global_step == cb.forecast.inputs.steps == 6 and cb.bytes_written == cb.projected_bytes


@pytest.mark.parametrize("limits, says", [
    (dict(max_steps=-1, max_epochs=None, max_time={"hours": 1}), "limited only by time (`max_time`, 3600 s)"),
    (dict(max_steps=-1, max_epochs=-1), "has no limit (`max_epochs=-1` and no `max_steps`)"),
])
def test_a_run_without_a_step_count_is_told_what_to_set(tmp_path, limits, says):
    with pytest.raises(ValueError, match="set `max_steps`") as err:
        trainer(tmp_path, [BudgetCallback(tmp_path / "s")], **limits).fit(TinyLM(), token_loader())
    assert says in str(err.value) and "IterableDataset" not in str(err.value)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["under a file", "NUL byte"])
def test_a_snapshot_dir_that_cannot_be_a_directory_names_the_argument(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "snap" if where == "under a file" else f"{tmp_path}/a\x00b"
    with pytest.raises(ValueError, match="`snapshot_dir`"):
        trainer(tmp_path, [BudgetCallback(path)], max_steps=1).fit(TinyLM(), token_loader())


def test_an_early_stop_keeps_the_forecast_and_says_how_the_run_compared(tmp_path):
    """projected_bytes is the exact count for the steps the run took; the fit-start forecast (for max_steps)
    stays in cb.forecast, and the summary says the run ended early."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Validated(TinyLM):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.model(*batch)[1])

    cb = BudgetCallback(tmp_path / "s")
    stop = EarlyStopping("val_loss", patience=0, min_delta=10.0, check_on_train_epoch_end=False)
    t = trainer(tmp_path, [cb, stop], max_steps=100, val_check_interval=3, limit_val_batches=1,
                num_sanity_val_steps=0)
    t.fit(Validated(), token_loader(), token_loader())
    assert t.global_step == 6 and cb.forecast.storage["snapshot_count"] == 100
    assert cb.bytes_written == cb.projected_bytes == _snapshot_bytes_on_disk(tmp_path / "s")
    assert cb.projected_bytes < cb.forecast.storage["snapshot_bytes"]
    assert "the fit-start forecast counted the run to step 100" in cb.summary()
    assert "ended early at step 6" in cb.summary()


def test_a_run_lengthened_after_the_start_says_the_forecast_was_short(tmp_path):
    class Lengthen(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                trainer.fit_loop.epoch_loop.max_steps = 5  # a curriculum that adds steps mid-run

    cb = BudgetCallback(tmp_path / "s")
    with pytest.warns(UserWarning, match="passed step 3, where the fit-start forecast expected it to end"):
        t = trainer(tmp_path, [cb, Lengthen()], max_steps=3)
        t.fit(TinyLM(), token_loader())
    assert t.global_step == 5 and [e["event"] for e in cb.events].count("past_forecast") == 1
    assert cb.bytes_written == cb.projected_bytes == _snapshot_bytes_on_disk(tmp_path / "s")
    assert "ran past the forecast at step 5" in cb.summary()


def test_resuming_a_finished_run_reports_the_series_as_it_stands(tmp_path):
    """A wrapper that always passes ckpt_path="last", run again after the job finished: no batch runs."""
    for again in (False, True):
        cb = BudgetCallback(tmp_path / "s")
        ckpt = ModelCheckpoint(tmp_path / "ck", save_last=True)
        trainer(tmp_path, [cb, ckpt], max_steps=4, enable_checkpointing=True).fit(
            TinyLM(), token_loader(), ckpt_path="last" if again else None)
    on_disk = _snapshot_bytes_on_disk(tmp_path / "s")
    assert cb.bytes_written == cb.projected_bytes == on_disk > 0
    assert "no batch ran in this fit (resumed at step 4" in cb.summary()
    assert SnapshotReader(tmp_path / "s").steps == [1, 2, 3, 4]
