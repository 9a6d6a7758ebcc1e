"""Decisions made once and shared with every rank, failures included, so no rank raises alone and hangs the others.

Lightning's own discipline (``strategy.broadcast``, ``reduce_boolean_decision``)
with one addition: an exception on the deciding rank is broadcast too, raised
there with its type and cause, and raised on every other rank as a clear error
of the same kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import BudgetExceededError, SnapshotDirInUseError, SnapshotWriteError

T = TypeVar("T")
# error types re-raised as themselves on the other ranks (constructible from a message)
_SHARED_TYPES = {cls.__name__: cls for cls in (BudgetExceededError, SnapshotDirInUseError, SnapshotWriteError,
                                                ValueError, FileNotFoundError)}


def _error_on_other_rank(kind: str, message: str) -> BaseException:
    cls = _SHARED_TYPES.get(kind)
    text = f"budget-callback: rank 0 failed: {message}" if cls else \
        f"budget-callback: rank 0 failed with {kind}: {message} (the full traceback is in rank 0's output)"
    return (cls or RuntimeError)(text)


def decide_on_rank_zero(strategy: Any, decide: Callable[[], T]) -> T:
    """Run ``decide`` on global rank 0 only; every rank returns its result or raises its error."""
    outcome: tuple = ("ok", None)
    error: BaseException | None = None
    if strategy.is_global_zero:
        try:
            outcome = ("ok", decide())
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised as is
            error = err
            outcome = ("error", type(err).__name__, str(err))
    outcome = strategy.broadcast(outcome, src=0)
    if outcome[0] == "ok":
        return outcome[1]
    if error is not None:
        raise error
    raise _error_on_other_rank(outcome[1], outcome[2])


def on_every_rank(strategy: Any, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails on any rank, every rank raises (its own error, or a clear one)."""
    result, error = None, None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 - shared below, then re-raised as is
        error = err
    all_ok = strategy.reduce_boolean_decision(error is None, all=True)
    if error is not None:
        raise error
    if not all_ok:
        raise RuntimeError("budget-callback: another rank failed while the callback started; see its error")
    return result


_OURS = {cls.__name__: cls for cls in (BudgetExceededError, SnapshotDirInUseError, SnapshotWriteError)}
_RAISED_IN_WORKER = re.compile(r"^budget_callback\.errors\.(\w+): (.*)", re.MULTILINE | re.DOTALL)


def raise_from_spawned_rank(exception: BaseException) -> None:
    """In the main process of ``ddp_spawn``, a rank's error arrives as torch's ``ProcessRaisedException``, which
    carries only the rank's traceback as text: when that error was ours, raise it as its own type (with the
    original chained), so ``except BudgetExceededError`` works as it does under every other strategy."""
    try:
        from torch.multiprocessing import ProcessRaisedException
    except ImportError:  # pragma: no cover - older torch
        return
    if not isinstance(exception, ProcessRaisedException):
        return
    found = _RAISED_IN_WORKER.search(str(exception))
    if found and found.group(1) in _OURS:
        raise _OURS[found.group(1)](found.group(2).strip()) from exception
