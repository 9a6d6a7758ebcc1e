"""budget-callback: forecast and guard the budgets of a Lightning run, stream W to safetensors.

The package imports lazily: ``budget-callback plan`` and ``budget_callback.forecast``
load neither Lightning nor torch. Layout:

- ``forecast/``  pure forecast math (ints in, ints out): shapes, parameters, memory, FLOPs,
  storage, W&B usage, budgets, the disk guard's decision, the human report;
- ``snapshots/`` the snapshot files: format and exact sizes, the interval schedule, the series
  (its one owner), the directory (lock, scan, resume edits), the writer and the reader;
- ``lightning/`` the Lightning side: the callback's hooks and the components they call;
- ``cli/``       ``budget-callback plan``;
- ``models/``    a reference transformer that declares its shape.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

_EXPORTS = {
    "BudgetCallback": "budget_callback.lightning.callback",
    "SnapshotReader": "budget_callback.snapshots.reader",
    "BudgetExceededError": "budget_callback.errors",
    "SnapshotWriteError": "budget_callback.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'budget_callback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
