"""Old import path, kept working: exact snapshot sizes live in :mod:`budget_callback.snapshots.format` and the
interval schedule in :mod:`budget_callback.snapshots.schedule`."""

from __future__ import annotations

from .snapshots.format import SNAPSHOT_DTYPES, SnapshotLayout, safetensors_file_bytes  # noqa: F401
from .snapshots.schedule import Schedule, series_bytes  # noqa: F401


def snapshot_count(steps: int, every: int) -> int:
    """Snapshots in a run of ``steps`` optimizer steps at interval ``every`` (one optimizer step per batch)."""
    return steps // every


def solve_interval(layout: SnapshotLayout, steps: int, requested: int, budget_bytes: int) -> int | None:
    """Smallest ``every >= requested`` whose snapshots fit ``budget_bytes``; None if not even one fits."""
    from .snapshots.schedule import solve_interval as solve

    return solve(Schedule.start(layout, requested), steps, budget_bytes) if budget_bytes >= 0 else None
