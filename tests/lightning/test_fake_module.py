"""The fit-start trace is hermetic: it runs the user's own module with fake tensors swapped in place, changes
nothing, holds nothing outside its fakes, draws no random number the run would have drawn, and proves it."""

import random
import resource
import threading
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from budget_callback import BudgetCallback
from budget_callback.lightning.fake_module import TraceNotHermetic
from budget_callback.lightning.tracing import trace_training_step_memory
from helpers import LlamaLM, token_loader, trainer
from step_probe import StepPeakProbe

np = pytest.importorskip("numpy")


def _fit(tmp_path, module, name="s", steps=4, extra=(), vocab=64, **kwargs):
    cb = BudgetCallback(tmp_path / name, verbose=False, **kwargs)
    trainer(tmp_path, [*extra, cb], max_steps=steps).fit(module, token_loader(vocab=vocab, seq=16, n=32))
    return cb


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_training_step_wrapped_on_the_instance_trains_and_forecasts_like_the_unwrapped_one(tmp_path):
    """Timing and profiling wrappers replace ``training_step`` on the instance with a closure over the bound
    method: the trace used to run the *real* module under FakeTensorMode (then SIGABRT / SIGSEGV)."""
    def make(wrapped: bool):
        torch.manual_seed(0)
        module = LlamaLM()
        if wrapped:
            orig = module.training_step
            module.training_step = lambda batch, batch_idx: orig(batch, batch_idx)
        return module

    plain, wrapped = make(False), make(True)
    cb_plain = _fit(tmp_path, plain, "a")
    cb_wrapped = _fit(tmp_path, wrapped, "b")
    assert cb_wrapped.forecast.memory["activations_method"] == cb_plain.forecast.memory["activations_method"]
    assert "traced training step" in cb_wrapped.forecast.memory["activations_method"]
    assert cb_wrapped.forecast.memory["peak_bytes"] == cb_plain.forecast.memory["peak_bytes"]
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain).values(), _weights(wrapped).values()))


class RandomStep(LlamaLM):
    """A training step that draws from Python's ``random`` and NumPy's global generator (token dropout, a
    random loss scale), as augmentation code does."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        keep = torch.from_numpy(np.random.rand(*x.shape) > 0.2)
        x = torch.where(keep, x, torch.zeros_like(x))
        logits = self(x)
        scale = random.uniform(0.5, 1.5)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) * scale


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    def run(with_callback: bool):
        L.seed_everything(7, verbose=False)
        module = RandomStep()
        callbacks = [BudgetCallback(tmp_path / f"s{int(with_callback)}", verbose=False)] if with_callback else []
        trainer(tmp_path, callbacks, max_steps=4).fit(module, token_loader(vocab=64, seq=16, n=32))
        return _weights(module), random.random(), float(np.random.rand())

    with_cb, without = run(True), run(False)
    assert with_cb[1:] == without[1:]  # the generators are where the run left them
    assert all(torch.equal(with_cb[0][k], without[0][k]) for k in without[0])


class Memmapped(LlamaLM):
    """nanoGPT's style: the dataset is a ``np.memmap`` held by the module."""

    def __init__(self, path) -> None:
        super().__init__()
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


class RssAt(L.Callback):
    """RSS when training starts and right after the fit-start forecast (listed after the BudgetCallback)."""

    def on_train_start(self, trainer, pl_module):
        self.start = _rss_bytes()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.after_forecast = _rss_bytes()


def test_a_memmapped_dataset_is_not_copied(tmp_path):
    path = tmp_path / "tokens.bin"
    with open(path, "wb") as fh:
        fh.truncate(200 * 1000 * 1000)  # 200 MB of tokens (sparse: reading it is what costs RSS)
    module = Memmapped(path)
    rss = RssAt()
    cb = BudgetCallback(tmp_path / "s", verbose=False)
    trainer(tmp_path, [cb, rss], max_steps=1).fit(module, token_loader(vocab=64, seq=16, n=32))
    assert "traced training step" in cb.forecast.memory["activations_method"]
    assert rss.after_forecast - rss.start < 50 * 1000 * 1000, rss.after_forecast - rss.start
    assert isinstance(module.tokens, np.memmap)


class Locked(LlamaLM):
    """A module holding a lock and an open file (``cannot pickle`` for a deep copy)."""

    def __init__(self, path) -> None:
        super().__init__(vocab=512, d=64)
        self.lock = threading.Lock()
        self.log_file = open(path, "w")  # noqa: SIM115 - closed by the test

    def training_step(self, batch, batch_idx):
        with self.lock:
            self.log_file.write("step\n")
        return super().training_step(batch, batch_idx)


def test_a_module_holding_a_lock_and_an_open_file_is_traced_exactly(tmp_path):
    module = Locked(tmp_path / "log.txt")
    probe = StepPeakProbe(2)
    cb = _fit(tmp_path, module, extra=(probe,), vocab=512)
    module.log_file.close()
    assert "traced training step" in cb.forecast.memory["activations_method"]
    assert abs(cb.forecast.memory["peak_bytes"] - probe.peak_bytes) / probe.peak_bytes < 0.01


STATS = torch.zeros(3)


class WritesOutside(LlamaLM):
    """A step that writes a real tensor the module does not own (a global counter)."""

    def training_step(self, batch, batch_idx):
        STATS.add_(1)
        return super().training_step(batch, batch_idx)


def test_a_step_that_writes_a_real_tensor_is_refused_before_the_write_and_said(tmp_path):
    STATS.zero_()
    module = WritesOutside()
    with pytest.raises(TraceNotHermetic, match="real tensor"):
        trace_training_step_memory(module, next(iter(token_loader(vocab=64, seq=16))), lambda m, b: m.training_step(b, 0))
    assert STATS.tolist() == [0.0, 0.0, 0.0]  # refused before it ran
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = _fit(tmp_path, module, memory_budget="1GiB")
    assert STATS.tolist() == [4.0, 4.0, 4.0]  # the four real steps, nothing from the trace
    verdict = cb.forecast.verdicts["memory"]
    assert "trace discarded" in verdict.basis or "trace discarded" in cb.forecast.memory["activations_method"] \
        or any("trace discarded" in n for n in cb.forecast.notes)
    assert any("budget-callback: memory:" in str(w.message) for w in caught)


def test_what_the_step_sets_on_the_module_is_put_back():
    """Lightning's demo Transformer caches its mask and positional table on the module in its forward: after a
    trace they are what they were (None), every parameter is the module's own, with no gradient."""
    from lightning.pytorch.demos import Transformer

    model = Transformer(vocab_size=100, ninp=32, nhead=2, nhid=32, nlayers=1)
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 100, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_training_step_memory(model, (x, x), lambda m, b: nn.functional.nll_loss(m(*b), b[1].view(-1)),
                                            optimizer_cls=torch.optim.SGD, optimizer_kwargs={"lr": 0.1})
    assert traced["values_answered"] >= 1  # nn.Transformer asked whether its mask is causal: answered
    assert model.src_mask is None and model.pos_encoder.pe is None
    assert all(p is params[k] and p.grad is None for k, p in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(t, torch._subclasses.FakeTensor) for t in model.state_dict().values())
