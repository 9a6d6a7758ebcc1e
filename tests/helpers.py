"""Tiny real models and data for Trainer tests."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape

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


def same_batches(steps: int, vocab: int = 50, seq: int = 8, batch: int = 4) -> DataLoader:
    """``steps`` batches that all hold the same tokens: W after step s does not depend on which batches ran."""
    g = torch.Generator().manual_seed(0)
    row = torch.randint(0, vocab, (1, seq + 1), generator=g).repeat(batch * steps, 1)
    return DataLoader(TensorDataset(row[:, :-1], row[:, 1:]), batch_size=batch)


def seeded_lm(**kwargs) -> TinyLM:
    """A TinyLM with the same initial weights in every process."""
    torch.manual_seed(0)
    return TinyLM(**kwargs)


def trainer(tmp_path, callbacks, max_steps: int = 6, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                   log_every_n_steps=1)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def checkpointed_run(tmp_path, snaps, steps: int = 6, ckpt_every: int = 4, **kwargs):
    """A run of TinyLM with BudgetCallback(snaps, **kwargs) checkpointing every ``ckpt_every`` steps into
    ``tmp_path/ckpt``; returns (callback, the path of the checkpoint at step ``ckpt_every``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from budget_callback import BudgetCallback

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)
    cb = BudgetCallback(snaps, **kwargs)
    trainer(tmp_path, [cb, ckpt], max_steps=steps, enable_checkpointing=True).fit(TinyLM(), token_loader(n=200))
    return cb, str(next(p for p in (tmp_path / "ckpt").iterdir() if f"step={ckpt_every}" in p.name))


def stall_first_write(monkeypatch, until) -> None:
    """A disk that stalls on the first write until ``until()`` holds (the training side has hit the full
    ring), then writes normally. Event-driven: no sleep decides the outcome; 60 s is only a safety bound."""
    import threading
    import time

    import budget_callback.snapshots.diskio as diskio

    real, first = diskio.write_snapshot_file, threading.Event()

    def stalled(*args, **kwargs):
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 60
            while not until() and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(diskio, "write_snapshot_file", stalled)


def write_series(directory, layout, steps, every: int = 1, stride: int = 1, fill=None, run_id: str = "test-run"):
    """A real series written by the real writer: batch ends at ``steps``, snapshots where the schedule says.

    ``fill(step, name)`` gives each matrix (default: ``step`` everywhere). Returns (series, writer)."""
    from budget_callback.snapshots.schedule import Schedule
    from budget_callback.snapshots.series import Series
    from budget_callback.snapshots.image import FileImage
    from budget_callback.snapshots.writer import SnapshotWriter

    fill = fill or (lambda step, name: torch.full((layout.vocab_size, layout.hidden_dim), float(step)))
    dtype = getattr(torch, layout.dtype)
    series = Series(directory, layout, run_id, Schedule.start(layout, every, stride))
    series.directory.mkdir(parents=True, exist_ok=True)
    series.write_manifest()
    writer = SnapshotWriter(series)
    writer.start()
    for step in steps:
        placement = series.place(step)
        if placement is not None:
            image = FileImage(layout)
            for name, view in image.prepare(placement.step, placement.every).items():
                view.copy_(fill(step, name).to(dtype))
            writer.submit(placement, image)
    writer.close()
    return series, writer


class LlamaBlock(nn.Module):
    """RMSNorm, grouped-query attention (4 query heads, 2 KV heads), SwiGLU: no ModelShape (traced forecast)."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.wq = nn.Linear(d, d, bias=False)
        self.wkv = nn.Linear(d, 2 * kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.w13 = nn.Linear(d, 2 * 3 * d, bias=False)
        self.w2 = nn.Linear(3 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(B, T, self.heads, self.hd).transpose(1, 2)
        k, v = self.wkv(h).view(B, T, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, D))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(nn.functional.silu(gate) * up)


class LlamaLM(L.LightningModule):
    """A Llama-style model (Meta's names: tok_embeddings, output) with an untied head; AdamW from torch."""

    def __init__(self, vocab: int = 64, d: int = 16, layers: int = 2, head: str = "output") -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        setattr(self, head, nn.Linear(d, vocab, bias=False))
        self.head_name = head

    def forward(self, x):
        h = self.tok_embeddings(x)
        for layer in self.layers:
            h = layer(h)
        return getattr(self, self.head_name)(self.norm(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class TwoOptimizerLM(TinyLM):
    """Manual optimization with two optimizers (body, head): global_step advances by 2 per batch."""

    def __init__(self, shape: ModelShape = None, **kwargs) -> None:
        super().__init__(shape or ModelShape(vocab_size=50, d_model=8, n_layer=1, n_head=2, n_ctx=8, tied=False),
                         **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        body_opt, head_opt = self.optimizers()
        for opt in (body_opt, head_opt):
            opt.zero_grad()
            loss = self.model(x, y)[1]
            self.manual_backward(loss)
            opt.step()
        self.log("train/loss", loss)

    def configure_optimizers(self):
        head = [self.model.lm_head.weight]
        body = [p for p in self.parameters() if p is not self.model.lm_head.weight]
        return torch.optim.AdamW(body, lr=1e-2), torch.optim.SGD(head, lr=0.1)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, options: str = ""):
    """A real small file system (root mounts a tmpfs); skips with the reason where that is refused."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount refused'}); "
                    "the portable ENOSPC tests cover the error path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Filler(L.Callback):
    """Another process's data landing on the same disk at a given step."""

    def __init__(self, path: Path, at_step: int, nbytes: int):
        self.path, self.at_step, self.nbytes, self.done = path, at_step, nbytes, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_step and not self.done:
            self.done = True
            with open(self.path, "wb") as fh:
                try:
                    fh.write(b"\0" * self.nbytes)
                except OSError as err:
                    assert err.errno == errno.ENOSPC


class LossOnly(nn.Module):
    """A model's whole step in one graph that returns the loss only (what a compiled ``training_step`` is)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model(x, y)[1]
