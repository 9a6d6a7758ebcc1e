"""Inputs gathered from a real Trainer: steps, steps per batch, counts, strategy names."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from budget_callback.lightning import inputs as R
from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape
from helpers import TinyLM, TwoOptimizerLM, token_loader


class Probe(L.Callback):
    def __init__(self):
        self.seen = None

    def on_train_start(self, trainer, module):
        stride = R.steps_per_batch(trainer, module)
        self.seen = (stride, R.final_step(trainer, stride), R.strategy_name(trainer))


@pytest.mark.parametrize("module, kwargs, expected", [
    (TinyLM, {"max_steps": 7}, (1, 7, "ddp")),
    (TinyLM, {"max_steps": -1, "max_epochs": 2}, (1, 32, "ddp")),  # 16 batches per epoch
    (TinyLM, {"max_steps": -1, "max_epochs": 2, "accumulate_grad_batches": 3}, (1, 12, "ddp")),
    (TwoOptimizerLM, {"max_steps": 9}, (2, 10, "ddp")),  # global_step 2, 4, ..., 10
    (TwoOptimizerLM, {"max_steps": -1, "max_epochs": 1}, (2, 32, "ddp")),
])
def test_final_step_and_steps_per_batch(tmp_path, module, kwargs, expected):
    probe = Probe()
    t = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[probe], default_root_dir=tmp_path, **kwargs)
    t.fit(module(), token_loader(n=64, batch=4))
    assert probe.seen == expected


def test_module_params_counts_shared_and_frozen_once():
    model = GPT(ModelShape(vocab_size=10, d_model=4, n_layer=1, n_head=1, n_ctx=4))
    model.wpe.weight.requires_grad_(False)
    counts = R.module_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["frozen"] == 16 and counts["tensors"] == len(list(model.parameters()))


def test_batch_dims_from_nested_batches():
    x = torch.zeros(3, 7, dtype=torch.long)
    assert R.batch_dims({"input_ids": x, "mask": x.float()}) == (3, 7)
    assert R.batch_dims([x.float(), (x,)]) == (3, 7)
    assert R.batch_dims(torch.zeros(3)) is None
