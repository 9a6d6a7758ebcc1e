"""Faults a user trying the callback found (each test failed before its fix): the callback must not change
what trains, must not write a torn W, must not break a compiled run, must say what it does not know."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from budget_callback import BudgetCallback, SnapshotReader
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


@pytest.mark.parametrize("who", ["module hook", "weight averaging"])
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
    assert any(e["event"] == "copy_guarded" for e in cb.events)


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
    assert cbs[0].forecast.memory["activations_method"] == "traced training step (fake tensors, cpu fake device)"


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
