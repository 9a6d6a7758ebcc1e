"""Lightning precision settings as byte sizes, checked against what Lightning and torch really do; optimizer
state counts checked against torch's optimizers."""

import warnings
from typing import get_args

import pytest
import torch
from lightning.fabric.connector import _convert_precision_to_unified_args
from lightning.fabric.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from budget_callback.forecast.precision import (OPTIMIZERS, PRECISIONS, STRATEGIES, normalise,
                                                optimizer_states_per_param, precision)

# name: (param_bytes, compute_bytes, residual_bytes, autocast, torch_dtype), by hand:
# "-mixed" keeps fp32 parameters and runs matmuls in 16 bits under autocast; "-true" stores and computes in one dtype.
EXPECTED = {
    "32-true": (4, 4, 4, False, "float32"),
    "16-mixed": (4, 2, 4, True, "float16"),
    "bf16-mixed": (4, 2, 4, True, "bfloat16"),
    "16-true": (2, 2, 2, False, "float16"),
    "bf16-true": (2, 2, 2, False, "bfloat16"),
    "64-true": (8, 8, 8, False, "float64"),
}

# Lightning's own plugin for each setting (what Trainer(precision=...) builds on a CPU)
PLUGINS = {
    "32-true": lambda: Precision(),
    "16-mixed": lambda: MixedPrecision("16-mixed", "cpu"),
    "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu"),
    "16-true": lambda: HalfPrecision("16-true"),
    "bf16-true": lambda: HalfPrecision("bf16-true"),
    "64-true": lambda: DoublePrecision(),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_byte_sizes_by_hand(name):
    p = precision(name)
    assert (p.param_bytes, p.compute_bytes, p.residual_bytes, p.autocast, p.torch_dtype) == EXPECTED[name]
    assert p.name == name


def test_the_table_is_exactly_these_settings():
    assert set(PRECISIONS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sizes_are_what_lightnings_plugin_really_allocates(name):
    """Parameters made under the plugin have ``param_bytes`` per element; inputs it converts have the matmul
    dtype, whose element size is ``compute_bytes``."""
    p = precision(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin = PLUGINS[name]()
    with plugin.module_init_context():
        layer = nn.Linear(2, 2)
    assert layer.weight.element_size() == p.param_bytes
    compute = plugin.convert_input(torch.zeros(1))
    assert compute.dtype == getattr(torch, p.torch_dtype)
    assert compute.element_size() == p.compute_bytes
    assert p.residual_bytes == layer.weight.element_size()  # the residual stream is in the parameters' dtype
    assert p.autocast == isinstance(plugin, MixedPrecision)


@pytest.mark.parametrize("typed", [16, "16", 32, "32", 64, "64", "bf16", "16-mixed", "bf16-mixed", "32-true",
                                   "16-true", "bf16-true", "64-true"])
def test_aliases_normalise_as_lightning_does(typed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _convert_precision_to_unified_args(typed)
    assert normalise(typed) == theirs
    assert precision(typed) is PRECISIONS[theirs]


def test_every_setting_is_a_lightning_precision():
    assert set(PRECISIONS) <= set(get_args(_PRECISION_INPUT_STR))


@pytest.mark.parametrize("bad", ["8-true", "fp16", "bf16-true-ish", 8])
def test_unknown_precision_names_the_argument_and_the_choices(bad):
    with pytest.raises(ValueError) as err:
        precision(bad)
    assert str(err.value).startswith("`precision` must be one of") and repr(bad) in str(err.value)
    assert all(name in str(err.value) for name in PRECISIONS)


def _states_torch_keeps(optimizer: str, momentum: float) -> int:
    """Parameter-shaped state tensors torch's optimizer holds per parameter after a step (``step`` is a scalar)."""
    w = nn.Parameter(torch.randn(3, 2))
    opt = {"adamw": lambda: torch.optim.AdamW([w]), "adam": lambda: torch.optim.Adam([w]),
           "sgd": lambda: torch.optim.SGD([w], lr=0.1, momentum=momentum)}[optimizer]()
    w.grad = torch.ones_like(w)
    opt.step()
    return sum(1 for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape)


@pytest.mark.parametrize("optimizer, momentum, states", [
    ("adamw", 0.0, 2), ("adam", 0.0, 2), ("sgd", 0.0, 0), ("sgd", 0.9, 1),
])
def test_optimizer_states_match_torch(optimizer, momentum, states):
    assert optimizer_states_per_param(optimizer, momentum) == states == _states_torch_keeps(optimizer, momentum)


def test_unknown_optimizer_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"`optimizer` must be one of adamw, adam, sgd, got 'lion'"):
        optimizer_states_per_param("lion")
    assert OPTIMIZERS == ("adamw", "adam", "sgd")


def test_strategies_are_lightning_strategy_names():
    assert set(STRATEGIES) <= set(StrategyRegistry.available_strategies())
