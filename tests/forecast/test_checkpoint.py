"""Forecast checkpoint size against the .ckpt Lightning really writes."""

import os

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from budget_callback import BudgetCallback
from budget_callback.forecast.checkpoint import checkpoint_bytes
from budget_callback.forecast.shapes import ModelShape
from helpers import TinyLM, token_loader, trainer


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("shape", [ModelShape(vocab_size=2000, d_model=64, n_layer=2, n_head=2, n_ctx=8),
                                   ModelShape(vocab_size=500, d_model=32, n_layer=4, n_head=4, n_ctx=8, tied=False)])
def test_checkpoint_forecast_within_one_percent(tmp_path, optimizer, shape):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=1)
    cb = BudgetCallback(tmp_path / "s", save_every_n_steps=100)
    trainer(tmp_path, [cb, ckpt], max_steps=2, enable_checkpointing=True).fit(
        TinyLM(shape, optimizer), token_loader(vocab=shape.vocab_size))
    (path,) = list((tmp_path / "ckpt").iterdir())
    real = os.path.getsize(path)
    forecast = cb.forecast.storage["checkpoint_bytes"]
    assert abs(forecast - real) / real < 0.01, (forecast, real)
    assert cb.forecast.storage["checkpoints_kept"] == 1


def test_checkpoint_bytes_counts_optimizer_state():
    adam = checkpoint_bytes(1_000_000, 10, 4, "adamw")
    sgd = checkpoint_bytes(1_000_000, 10, 4, "sgd")
    assert adam - sgd > 8_000_000  # two fp32 moments
    assert checkpoint_bytes(1_000_000, 10, 4, "sgd", momentum=0.9) - sgd >= 4_000_000
