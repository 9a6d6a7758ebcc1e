"""Model factories for `budget-callback plan --model plan_models:NAME` (tests/ is the working directory's path
in the tests: the plan imports from the current directory first, as `python -m` does)."""

import lightning as L
import torch
from torch import nn

from budget_callback.forecast.shapes import ModelShape
from budget_callback.models.gpt import GPT
from helpers import LensLM, LlamaLM, TwoOptimizerLM

V = 512


class UntypedGPT(L.LightningModule):
    """The reference GPT behind a LightningModule that declares no shape (traced)."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.net = GPT(ModelShape(vocab_size=V, d_model=64, n_layer=layers, n_head=4, n_ctx=64))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0], batch[1])[1]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=False)


class Demo(L.LightningModule):
    """Lightning's demo Transformer (``nn.Transformer``)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=V, ninp=64, nhead=2, nhid=64, nlayers=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


class Core(nn.Module):
    """A plain nn.Module: embedding, two Llama blocks, a head; its logits are all it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LlamaLM(vocab=V, d=64, layers=2)

    def forward(self, x):
        return self.inner(x)


class Wrapped(L.LightningModule):
    """``Core`` trained the way the plan trains a plain nn.Module: cross-entropy of its logits, AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.core = Core()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.core(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), foreach=False)


FACTORIES = {
    "llama": lambda: LlamaLM(vocab=V, d=64, layers=2),
    "untyped_gpt": UntypedGPT,
    "deep_gpt": lambda: UntypedGPT(layers=6),  # a stack deep enough to be extrapolated
    "manual": lambda: TwoOptimizerLM(ModelShape(vocab_size=V, d_model=64, n_layer=2, n_head=4, n_ctx=64, tied=False)),
    "lens": lambda: LensLM(vocab=V, d=64),
    "demo": Demo,
}


def llama():
    return FACTORIES["llama"]()


def untyped_gpt():
    return FACTORIES["untyped_gpt"]()


def deep_gpt():
    return FACTORIES["deep_gpt"]()


def manual():
    return FACTORIES["manual"]()


def lens():
    return FACTORIES["lens"]()


def demo():
    return FACTORIES["demo"]()


def core():
    return Core()


def not_a_module():
    return 42
