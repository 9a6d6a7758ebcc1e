"""The disk guard's decision during a run (pure: free space in, action out).

Checked on a step cadence that all ranks share: rarely when there is plenty
of room (at most every ``MAX_CHECK_GAP`` steps), every step when it is tight,
so there is no syscall per step when the disk is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..snapshots.schedule import Schedule, solve_interval

MAX_CHECK_GAP = 1000  # steps between checks at most
HEADROOM_FRACTION = 8  # re-check before 1/8 of the room could have been written by us
ACTIONS = ("ok", "raise_interval", "pause", "stop", "warn")


@dataclass(frozen=True)
class GuardDecision:
    action: str  # one of ACTIONS
    every: int | None  # interval from the next step on (None: paused)
    next_check_step: int
    free_bytes: int
    available_bytes: int  # room for the rest of the series: free space (or budget left)
    needed_bytes: int  # bytes the rest of the series needs at the current interval

    def to_event(self, step: int) -> dict:
        return {"step": step, "event": f"disk_guard_{self.action}", "every": self.every,
                "free_bytes": self.free_bytes, "needed_bytes": self.needed_bytes}


def next_check(schedule: Schedule, final_step: int, available: int) -> int:
    """The next step to look at the disk again: before 1/8 of the room could be used, at most 1,000 steps on."""
    step, every = schedule.last_step, schedule.interval
    per_step = max(1, schedule.layout.step_bytes // max(1, every))
    gap = max(1, min(MAX_CHECK_GAP, available // HEADROOM_FRACTION // per_step))
    return min(step + gap, max(step + 1, final_step))


def decide(schedule: Schedule, final_step: int, free_bytes: int, budget_bytes: int | None, on_disk_bytes: int,
           policy: str, headroom_bytes: int = 0) -> GuardDecision:
    """What to do after the batch end at ``schedule.last_step`` with ``free_bytes`` free.

    ``on_disk_bytes``: the series' bytes already on disk; ``budget_bytes``: the
    user's disk budget for the whole series (None: free space only); ``headroom_bytes``: kept free for a
    stacked file rewritten bigger after a checkpoint (old and new copy at once). The rest of
    the series needs ``projected - on_disk`` bytes; an interval change applies
    from the next step, so a snapshot already due is never skipped.
    """
    room = (free_bytes if budget_bytes is None else min(free_bytes, budget_bytes - on_disk_bytes)) - headroom_bytes
    needed = schedule.projected_bytes(final_step) - on_disk_bytes
    every = schedule.every
    if schedule.paused or needed <= room:
        return GuardDecision("ok", every, next_check(schedule, final_step, max(0, room - needed)), free_bytes, room,
                             needed)
    step = schedule.last_step
    if policy == "warn":
        return GuardDecision("warn", every, step + 1, free_bytes, room, needed)
    if policy == "abort":
        return GuardDecision("stop", every, step + 1, free_bytes, room, needed)
    solved = solve_interval(schedule, final_step, on_disk_bytes + room, at_least=every + 1) if room > 0 else None
    if solved is None:
        return GuardDecision("pause", None, step + 1, free_bytes, room, needed)
    return GuardDecision("raise_interval", solved, step + 1, free_bytes, room, needed)
