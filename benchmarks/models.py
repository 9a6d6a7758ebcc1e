"""Small real models and data for the Trainer-based benchmarks (like tests/helpers.py, kept separate)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape


class ShapeLM(L.LightningModule):
    """A GPT from a ModelShape (the callback recognises it: analytic forecast)."""

    def __init__(self, shape: ModelShape, optimizer: str = "adamw", log_loss: bool = True) -> None:
        super().__init__()
        self.model = GPT(shape)
        self.optimizer = optimizer
        self.log_loss = log_loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, y)[1]
        if self.log_loss:
            self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(vocab: int, seq: int, n: int, batch: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch)


def trainer(root, callbacks, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   log_every_n_steps=1)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)
