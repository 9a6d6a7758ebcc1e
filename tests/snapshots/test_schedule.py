"""The schedule: the due rule, file placement, exact projection, the interval solver (pure, table-driven)."""

import random

import pytest

import budget_callback.snapshots.schedule as S
from budget_callback.snapshots.format import SnapshotLayout
from budget_callback.snapshots.schedule import Schedule, series_bytes, solve_interval

LAYOUT = SnapshotLayout(7, 3, "float32")


def brute_labels(last, final, every, stride):
    """The contract, step by step: a snapshot at the first batch end at or past each multiple of ``every``."""
    out, s = [], last
    while s < final:
        prev, s = s, s + stride
        if s // every * every > prev:
            out.append(s)
    return out


def brute_bytes(layout, labels, every):
    K = layout.snapshots_per_file
    return sum(layout.file_bytes_for(labels[i:i + K], every) for i in range(0, len(labels), K))


@pytest.mark.parametrize("every, stride, seen, due", [
    (1, 1, [1, 2, 3], [1, 2, 3]),
    (3, 1, range(1, 10), [3, 6, 9]),
    (3, 2, [2, 4, 6, 8, 10, 12], [4, 6, 10, 12]),  # two optimizers: the first batch end at or past each multiple
    (1, 2, [2, 4, 6], [2, 4, 6]),  # more than the interval per batch: one snapshot per batch end
    (4, 2, [2, 4, 6, 8], [4, 8]),
    (2, 1, [1, 1, 1, 2, 2, 3, 4], [2, 4]),  # gradient accumulation: repeated steps are not new steps
    (5, 3, [3, 7, 8, 15], [7, 15]),  # irregular jumps
])
def test_due_rule(every, stride, seen, due):
    schedule = Schedule.start(LAYOUT, every, stride)
    taken = [p.step for s in seen if (p := schedule.advance(s)) is not None]
    assert taken == due


def test_raising_the_interval_keeps_the_snapshot_due_at_that_step():
    """The guard decides after the snapshot of step s; the new interval counts from s + 1."""
    schedule = Schedule.start(LAYOUT, 3)
    taken = []
    for step in range(1, 21):
        p = schedule.advance(step)
        taken += [p.step] if p else []
        if step == 6:
            schedule.change_interval(4)
    assert taken == [3, 6, 8, 12, 16, 20]
    assert schedule.history() == [{"from_step": 1, "every": 3}, {"from_step": 7, "every": 4}]


def test_pause_and_files_never_span_an_interval_change():
    layout = SnapshotLayout(7, 3, "float32", 4)
    schedule = Schedule.start(layout, 1)
    placements = [schedule.advance(s) for s in range(1, 7)]
    schedule.change_interval(None)
    assert schedule.paused and schedule.advance(7) is None
    assert [p.file_step for p in placements] == [1, 1, 1, 1, 5, 5]
    assert schedule.closed_files == 2 and schedule.open == []  # the pause closed the partial file
    assert schedule.due_bytes() == layout.file_bytes_for([1, 2, 3, 4], 1) + layout.file_bytes_for([5, 6], 1)


def test_projection_equals_the_files_the_rule_makes():
    """Exact, for every interval, stride, start, stacking: the projection made at the start equals the bytes
    of the files the step-by-step rule makes (random cases, fixed seed)."""
    rng = random.Random(1)
    for _ in range(600):
        K = rng.choice([1, 1, 2, 3, 5])
        layout = SnapshotLayout(rng.choice([3, 50]), rng.choice([1, 8]), rng.choice(["float32", "bfloat16"]), K)
        every, stride = rng.randint(1, 12), rng.randint(1, 5)
        last = rng.choice([0, stride * rng.randint(0, 5), rng.randint(0, 40)])
        final = last + stride * rng.randint(0, rng.choice([60, 3000]))
        schedule = Schedule.start(layout, every, stride, last)
        projected = schedule.projected_bytes(final)
        s = last
        while s < final:
            s += stride
            schedule.advance(s)
        labels = brute_labels(last, final, every, stride)
        assert projected == schedule.due_bytes() == brute_bytes(layout, labels, every), (K, every, stride, last)
        assert schedule.snapshots == len(labels)


def test_data_rate_calculator_example_and_huge_runs():
    layout = SnapshotLayout(10_000, 64, "bfloat16")
    assert series_bytes(layout, 10_000, 1) == 12_801_760_008  # 11.92 GiB
    huge = Schedule.start(layout, 3).projected_bytes(10**21)
    assert huge == series_bytes(layout, 10**21, 3) > 10**21 // 3 * layout.step_bytes


def test_state_round_trip_continues_identically():
    layout = SnapshotLayout(7, 3, "float32", 3)
    a = Schedule.start(layout, 2, 1)
    for s in range(1, 10):
        a.advance(s)
    b = Schedule.from_state(layout, a.state())
    for s in range(10, 30):
        assert a.advance(s) == b.advance(s)
    assert a.state() == b.state() and a.projected_bytes(50) == b.projected_bytes(50)
    with pytest.raises(ValueError, match="lacks"):
        Schedule.from_state(layout, {"segments": []})


def _brute_solve(schedule, final, budget):
    for k in range(schedule.every, max(schedule.every, final) + 1):
        trial = schedule if k == schedule.every else schedule.with_interval(k)
        if trial.future(final).count and trial.projected_bytes(final) <= budget:
            return k
    return None


def test_solver_is_exact():
    rng = random.Random(2)
    for _ in range(400):
        K = rng.choice([1, 1, 2, 3])
        layout = SnapshotLayout(rng.choice([3, 50]), rng.choice([1, 8]), "float32", K)
        every, stride = rng.randint(1, 6), rng.randint(1, 4)
        last = stride * rng.randint(0, 5)
        final = last + stride * rng.randint(1, 80)
        schedule = Schedule.start(layout, every, stride, last)
        s = last
        for _ in range(rng.randint(0, 5)):  # some progress: an open stacked file
            if s + stride < final:
                s += stride
                schedule.advance(s)
        budget = rng.randint(0, schedule.projected_bytes(final) + 200)
        assert solve_interval(schedule, final, budget) == _brute_solve(schedule, final, budget)


@pytest.mark.parametrize("steps, budget, requested", [(10**21, 999 * 10**12, 3), (10**21, 10**6, 1), (10**9, 5 * 10**9, 1)])
def test_solver_on_huge_runs_is_exact_and_does_little_work(monkeypatch, steps, budget, requested):
    """`plan --steps 10**21 --save-every 3 --disk-budget 999TB` scanned intervals one by one; it must not."""
    calls = []
    real = S.files_bytes
    monkeypatch.setattr(S, "files_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    every = solve_interval(Schedule.start(LAYOUT, requested), steps, budget)
    assert len(calls) < 5_000
    assert series_bytes(LAYOUT, steps, every) <= budget < series_bytes(LAYOUT, steps, every - 1)


@pytest.mark.parametrize("budget, expected", [(0, None), (100, None)])
def test_solver_nothing_fits(budget, expected):
    assert solve_interval(Schedule.start(LAYOUT, 1), 500, budget) is expected


def test_solver_budget_of_one_snapshot():
    one = LAYOUT.file_bytes(251, 1, 251)
    assert solve_interval(Schedule.start(LAYOUT, 1), 500, one) == 251
