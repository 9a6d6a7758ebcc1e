"""Rank-0 decisions in one process (the multi-process cases run in test_distributed.py)."""

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from budget_callback.errors import BudgetExceededError
from budget_callback.lightning.distributed import _error_on_other_rank, decide_on_rank_zero, on_every_rank

STRATEGY = SingleDeviceStrategy(device=torch.device("cpu"))


def test_rank_zero_returns_and_reraises_the_original_error():
    assert decide_on_rank_zero(STRATEGY, lambda: 42) == 42
    err = KeyError("x")
    with pytest.raises(KeyError) as info:
        decide_on_rank_zero(STRATEGY, lambda: (_ for _ in ()).throw(err))
    assert info.value is err
    with pytest.raises(ZeroDivisionError):
        on_every_rank(STRATEGY, lambda: 1 / 0)


@pytest.mark.parametrize("kind, cls, text", [
    ("BudgetExceededError", BudgetExceededError, "rank 0 failed: disk"),
    ("ValueError", ValueError, "rank 0 failed: disk"),
    ("KeyError", RuntimeError, "rank 0 failed with KeyError: disk (the full traceback is in rank 0's output)"),
])
def test_the_other_ranks_error(kind, cls, text):
    err = _error_on_other_rank(kind, "disk")
    assert type(err) is cls and text in str(err)
