"""The disk guard's decision, per policy (pure: numbers in, action out; no tmpfs needed)."""

import pytest

from budget_callback.forecast.disk_guard import MAX_CHECK_GAP, decide
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.schedule import Schedule, series_bytes, solve_interval

LAYOUT = SnapshotLayout(1000, 64, "bfloat16")  # 128,000 B of data per snapshot
STEPS = 100


def _at(step: int, every: int = 1) -> Schedule:
    """The schedule after the batch end of ``step`` (snapshots every ``every``)."""
    schedule = Schedule.start(LAYOUT, every)
    for s in range(1, step + 1):
        schedule.advance(s)
    return schedule


def _on_disk(schedule: Schedule) -> int:
    return schedule.due_bytes()


def _rest(schedule: Schedule) -> int:
    return schedule.projected_bytes(STEPS) - schedule.due_bytes()


@pytest.mark.parametrize("policy, room_factor, action", [
    ("downsample", 2.0, "ok"), ("abort", 2.0, "ok"), ("warn", 2.0, "ok"),
    ("downsample", 0.5, "raise_interval"), ("abort", 0.5, "stop"), ("warn", 0.5, "warn"),
    ("downsample", 0.001, "pause"), ("abort", 0.001, "stop"), ("warn", 0.001, "warn"),
])
def test_action_per_policy(policy, room_factor, action):
    schedule = _at(40)
    free = int(_rest(schedule) * room_factor)
    decision = decide(schedule, STEPS, free, None, _on_disk(schedule), policy)
    assert decision.action == action
    assert decision.needed_bytes == _rest(schedule) and decision.available_bytes == free
    if action == "raise_interval":
        k = decision.every
        assert k == solve_interval(schedule, STEPS, _on_disk(schedule) + free, at_least=2)
        assert schedule.with_interval(k).projected_bytes(STEPS) - _on_disk(schedule) <= free
        assert all(schedule.with_interval(j).projected_bytes(STEPS) - _on_disk(schedule) > free for j in range(2, k))
    if action == "pause":
        assert decision.every is None
    if action != "ok":
        assert decision.next_check_step == 41  # tight: look again at the next step


def test_the_budget_counts_what_is_already_written():
    """With a disk budget, what the series already has on disk is part of it: the room is budget - on disk."""
    schedule = _at(40)
    on_disk = _on_disk(schedule)
    budget = on_disk + _rest(schedule)  # exactly enough
    assert decide(schedule, STEPS, 10**12, budget, on_disk, "abort").action == "ok"
    assert decide(schedule, STEPS, 10**12, budget - 1, on_disk, "abort").action == "stop"


def test_check_cadence_is_rare_when_there_is_room():
    schedule = _at(10)
    assert decide(schedule, 10_000, 10**15, None, _on_disk(schedule), "downsample").next_check_step == 10 + MAX_CHECK_GAP


def test_check_cadence_follows_the_headroom():
    """Look again before 1/8 of the headroom could be used: headroom for 8 x 5 snapshots -> 5 steps on."""
    schedule = _at(10)
    free = _rest(schedule) + 8 * 5 * LAYOUT.step_bytes
    decision = decide(schedule, STEPS, free, None, _on_disk(schedule), "downsample")
    assert decision.action == "ok" and decision.next_check_step == 15


def test_paused_series_is_left_alone():
    schedule = _at(10)
    schedule.change_interval(None)
    assert decide(schedule, STEPS, 0, None, _on_disk(schedule), "downsample").action == "ok"


def test_the_exact_total_of_a_raised_interval():
    schedule = _at(40, every=2)
    free = _rest(schedule) // 3
    decision = decide(schedule, STEPS, free, None, _on_disk(schedule), "downsample")
    k = decision.every
    assert decision.action == "raise_interval" and k > 2
    # after the change the series is the 20 snapshots so far plus multiples of k after step 40
    expected = series_bytes(LAYOUT, 40, 2) + series_bytes(LAYOUT, STEPS, k, start_step=40)
    assert schedule.with_interval(k).projected_bytes(STEPS) == expected
