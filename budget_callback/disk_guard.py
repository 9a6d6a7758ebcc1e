"""The disk guard's decision during a run (pure: free space in, action out).

Checked on a step cadence that all ranks share: rarely when there is plenty
of room (at most every ``MAX_CHECK_GAP`` steps), every step when it is tight,
so there is no syscall per step when the disk is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from .storage import SnapshotLayout

MAX_CHECK_GAP = 1000  # steps between checks at most
HEADROOM_FRACTION = 8  # re-check before 1/8 of the room could have been written by us


@dataclass(frozen=True)
class GuardDecision:
    action: str  # "ok" | "raise_interval" | "pause" | "stop" | "warn"
    every: int  # interval from the next step on
    next_check_step: int
    free_bytes: int
    available_bytes: int  # room for snapshots: free (or budget left) minus queued bytes
    needed_bytes: int  # bytes the remaining snapshots need at the current interval

    def to_event(self, step: int) -> dict:
        return {"step": step, "event": f"disk_guard_{self.action}", "every": self.every,
                "free_bytes": self.free_bytes, "needed_bytes": self.needed_bytes}


def next_check(step: int, steps: int, every: int, layout: SnapshotLayout, available: int) -> int:
    per_step = max(1, layout.step_bytes // max(1, every))
    gap = max(1, min(MAX_CHECK_GAP, available // HEADROOM_FRACTION // per_step))
    return min(step + gap, steps)


def remaining_interval(layout: SnapshotLayout, steps: int, step: int, every: int, room: int) -> int | None:
    """Smallest interval >= ``every`` whose snapshots after ``step`` fit ``room`` bytes; None if none do."""
    if room <= 0:
        return None
    span = steps - step
    if span <= 0:
        return every
    fits = lambda k: layout.series_bytes(steps, k, start_step=step) <= room  # noqa: E731
    if fits(every):
        return every
    lo, hi = every, every * 2
    while hi <= span and not fits(hi):
        lo, hi = hi, hi * 2
    if hi > span:
        hi = span
        if not fits(hi) or layout.series_bytes(steps, hi, start_step=step) == 0:
            return None
    for k in range(lo + 1, hi + 1):  # exact, smallest first
        if fits(k) and layout.series_bytes(steps, k, start_step=step) > 0:
            return k
    return None


def decide(layout: SnapshotLayout, steps: int, step: int, every: int, free_bytes: int, budget_left: int | None,
           pending_bytes: int, policy: str) -> GuardDecision:
    """What to do at ``step`` with ``free_bytes`` free on the snapshot file system."""
    room = free_bytes if budget_left is None else min(free_bytes, budget_left)
    available = room - pending_bytes
    needed = layout.series_bytes(steps, every, start_step=step)
    if needed <= available:
        return GuardDecision("ok", every, next_check(step, steps, every, layout, available), free_bytes, available,
                             needed)
    if policy == "warn":
        action, new_every = "warn", every
    elif policy == "abort":
        action, new_every = "stop", every
    else:
        solved = remaining_interval(layout, steps, step, every, available)
        action, new_every = ("raise_interval", solved) if solved is not None else ("pause", every)
    return GuardDecision(action, new_every, step + 1, free_bytes, available, needed)
