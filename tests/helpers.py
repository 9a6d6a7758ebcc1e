"""Tiny real models and data for Trainer tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from budget_callback.gpt import GPT
from budget_callback.shapes import ModelShape

TINY = ModelShape(vocab_size=50, d_model=8, n_layer=1, n_head=2, n_ctx=8, name="test-tiny")


class TinyLM(L.LightningModule):
    """A GPT from a ModelShape (recognised by the callback: analytic forecast)."""

    def __init__(self, shape: ModelShape = TINY, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model = GPT(shape)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, y)[1]
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class LensLM(L.LightningModule):
    """TransformerLens-style: W_E (V, D) and W_U (D, V) parameters, no ModelShape (traced forecast)."""

    def __init__(self, vocab: int = 40, d: int = 6) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(vocab, d) * 0.1)
        self.mix = nn.Linear(d, d)
        self.W_U = nn.Parameter(torch.randn(d, vocab) * 0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.mix(self.W_E[x]))
        logits = h @ self.W_U
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader(vocab: int = 50, seq: int = 8, n: int = 64, batch: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch)


def trainer(tmp_path, callbacks, max_steps: int = 6, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                   log_every_n_steps=1)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)
