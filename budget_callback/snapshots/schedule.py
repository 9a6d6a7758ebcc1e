"""When snapshots are due, which file each one goes to, and the exact bytes of the series (pure).

The rule (the public contract): with interval ``k`` a snapshot is due at the
first batch end at or past each multiple of ``k``, labelled with the trainer's
``global_step`` there. When one batch advances ``global_step`` by more than one
(manual optimization with several optimizers), the label is the step reached;
when it advances by more than ``k``, one snapshot covers every multiple passed.

A :class:`Schedule` is the single history of a series: the interval segments
(the guard may raise the interval or pause), the optimizer step last seen, and
the files so far (closed files as exact bytes, the open stacked file as its
steps). Everything else is derived from it: whether a step is due, the file
and slot of each snapshot, the bytes due by now, and the projected bytes of the
whole run, which continues the last seen optimizer steps per batch (the
*stride*) to the final step. Files never span an interval change.

Projection is exact and fast: files are grouped by the digit count of their
steps (the only thing that changes a header's length), so a run of 10**21 steps
costs a few dozen header computations, not one per file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import SnapshotLayout, is_regular

STATE_KEYS = ("segments", "stride", "last_step", "closed_bytes", "closed_files", "snapshots", "open")


def _digits(n: int) -> int:
    return len(str(n))


@dataclass(frozen=True)
class Labels:
    """A monotone sequence of snapshot steps, by index: ``at(i)`` for ``0 <= i < count``."""

    count: int
    first: int  # at(0) when count > 0
    spacing: int  # for kind "lattice"/"regular": at(i) = first + i * spacing
    kind: str = "regular"  # "regular" | "mapped" (multiples of every mapped onto a batch-end lattice)
    last: int = 0  # mapped: the lattice origin (last seen step)
    stride: int = 1  # mapped: optimizer steps per batch end
    m0: int = 0  # mapped: first multiple index
    every: int = 1  # mapped: the interval

    def at(self, i: int) -> int:
        if self.kind == "regular":
            return self.first + i * self.spacing
        target = (self.m0 + i) * self.every  # first batch end at or past this multiple
        return self.last + -(-(target - self.last) // self.stride) * self.stride


def future_labels(last: int, final: int, every: int | None, stride: int) -> Labels:
    """Steps of the snapshots due after ``last`` up to ``final``, batch ends every ``stride`` steps."""
    span = final - last
    if every is None or span <= 0:
        return Labels(0, 0, 1)
    stride = max(1, stride)
    if stride >= every:  # every batch end passes a multiple
        return Labels(span // stride, last + stride, stride)
    m0, m1 = last // every + 1, final // every
    count = max(0, m1 - m0 + 1)
    if every % stride == 0:  # every multiple is the same distance before a batch end: evenly spaced
        return Labels(count, m0 * every + last % stride, every)
    mapped = Labels(count, 0, 0, "mapped", last, stride, m0, every)
    return Labels(count, mapped.at(0), 0, "mapped", last, stride, m0, every)


def regular_in(labels: Labels, every: int) -> bool:
    """True when consecutive labels are exactly ``every`` apart (files then need no explicit list)."""
    return labels.count <= 1 or (labels.kind == "regular" and labels.spacing == every)


def _chars(labels: Labels, a: int, b: int) -> int:
    """Characters of ``",".join(str(labels.at(i)) for i in range(a, b))``, by digit groups."""
    total, i = b - a - 1, a
    while i < b:
        d = _digits(labels.at(i))
        lo, hi = i, b - 1  # last index < b whose label has d digits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _digits(labels.at(mid)) == d else (lo, mid - 1)
        total += (lo - i + 1) * d
        i = lo + 1
    return total


def files_bytes(layout: SnapshotLayout, every: int, labels: Labels, open_steps: list[int] | None = None) -> int:
    """Exact bytes of the files holding ``open_steps`` (an open stacked file) then ``labels``, K per file."""
    K = layout.snapshots_per_file
    regular = regular_in(labels, every)
    open_steps = list(open_steps or [])
    total, start = 0, 0
    if open_steps:
        take = min(K - len(open_steps), labels.count)
        steps = open_steps + [labels.at(t) for t in range(take)]
        total += layout.file_bytes_for(steps, every)
        start = take

    def size(a: int, count: int) -> int:
        chars = None if regular or count == 1 else _chars(labels, a, a + count)
        return layout.file_bytes(labels.at(a), count, every, chars)

    full, rest = divmod(labels.count - start, K)
    f = 0
    while f < full:
        a = start + f * K
        d = _digits(labels.at(a))
        if _digits(labels.at(a + K - 1)) != d:  # straddles a digit boundary: on its own
            total += size(a, K)
            f += 1
            continue
        lo, hi = f, full - 1  # last file whose steps all have d digits: all the same size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _digits(labels.at(start + mid * K + K - 1)) == d else (lo, mid - 1)
        total += (lo - f + 1) * size(a, K)
        f = lo + 1
    if rest:
        total += size(start + full * K, rest)
    return total


@dataclass(frozen=True)
class Placement:
    """Where a due snapshot goes: its step, the file (keyed by its first step) and the slot in it."""

    step: int
    file_step: int
    slot: int
    every: int


@dataclass
class Segment:
    start: int  # first optimizer step governed by this interval
    every: int | None  # None: paused

    def to_dict(self) -> dict:
        return {"from_step": self.start, "every": self.every}


@dataclass
class Schedule:
    """The single interval history of a series, and everything derived from it (see the module doc)."""

    layout: SnapshotLayout
    segments: list[Segment]
    stride: int = 1  # optimizer steps per batch end, as last seen (predicts the rest of the run)
    last_step: int = 0  # optimizer step at the last batch end seen
    closed_bytes: int = 0  # exact bytes of the files already complete
    closed_files: int = 0
    snapshots: int = 0  # snapshots due so far
    open: list[int] = field(default_factory=list)  # steps of the stacked file being filled

    @classmethod
    def start(cls, layout: SnapshotLayout, every: int, stride: int = 1, last_step: int = 0) -> Schedule:
        return cls(layout, [Segment(last_step + 1, every)], max(1, stride), last_step)

    # --- the current interval ----------------------------------------------------------
    @property
    def every(self) -> int | None:
        return self.segments[-1].every

    @property
    def paused(self) -> bool:
        return self.every is None

    @property
    def interval(self) -> int:
        """The effective interval (the last one used while paused)."""
        return next((s.every for s in reversed(self.segments) if s.every is not None), 1)

    # --- the rule ----------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """True when a batch end at optimizer step ``step`` passes a multiple of the interval."""
        k = self.every
        if k is None or step <= self.last_step:
            return False
        lowest = max(self.last_step + 1, self.segments[-1].start)
        return step // k * k >= lowest

    def advance(self, step: int) -> Placement | None:
        """Record a batch end at optimizer step ``step``; where its snapshot goes, if one is due."""
        if step <= self.last_step:
            return None  # no optimizer step since the last batch end (accumulation)
        due = self.is_due(step)
        self.stride, self.last_step = step - self.last_step, step
        if not due:
            return None
        self.open.append(step)
        self.snapshots += 1
        placement = Placement(step, self.open[0], len(self.open) - 1, self.every)
        if len(self.open) == self.layout.snapshots_per_file:
            self.close_file()
        return placement

    def change_interval(self, every: int | None) -> None:
        """From the next optimizer step on, snapshot every ``every`` steps (None: pause)."""
        self.close_file()
        if self.segments[-1].start > self.last_step:  # nothing happened under the last one: replace it
            self.segments[-1] = Segment(self.last_step + 1, every)
        else:
            self.segments.append(Segment(self.last_step + 1, every))

    def close_file(self) -> None:
        """End the open stacked file (full, an interval change, or the end of the run)."""
        if self.open:
            self.closed_bytes += self.layout.file_bytes_for(self.open, self._open_every())
            self.closed_files += 1
            self.open = []

    def _open_every(self) -> int:
        return self.every if self.every is not None else self.interval

    # --- bytes ----------------------------------------------------------------------------------
    def due_bytes(self) -> int:
        """Exact bytes of the snapshots due so far (the open file as it stands)."""
        return self.closed_bytes + (self.layout.file_bytes_for(self.open, self._open_every()) if self.open else 0)

    def future(self, final_step: int, every: int | None = None, stride: int | None = None) -> Labels:
        return future_labels(self.last_step, final_step, self.every if every is None else every,
                             self.stride if stride is None else stride)

    def projected_bytes(self, final_step: int) -> int:
        """Exact bytes of the whole series if the run ends at optimizer step ``final_step``."""
        if self.every is None:
            return self.due_bytes()
        return self.closed_bytes + files_bytes(self.layout, self.every, self.future(final_step), self.open)

    def projected_count(self, final_step: int) -> int:
        return self.snapshots + (self.future(final_step).count if self.every is not None else 0)

    def projected_files(self, final_step: int) -> int:
        K = self.layout.snapshots_per_file
        n = self.future(final_step).count if self.every is not None else 0
        if self.open:
            return self.closed_files + 1 + -(-max(0, n - (K - len(self.open))) // K)
        return self.closed_files + -(-n // K)

    def with_interval(self, every: int | None) -> Schedule:
        """A copy that changes the interval from the next step on (for trying candidates)."""
        trial = Schedule.from_state(self.layout, self.state())
        trial.change_interval(every)
        return trial

    # --- plain state (checkpoints, manifest) ------------------------------------------------------
    def history(self) -> list[dict]:
        return [s.to_dict() for s in self.segments]

    def state(self) -> dict:
        return {"segments": self.history(), "stride": self.stride, "last_step": self.last_step,
                "closed_bytes": self.closed_bytes, "closed_files": self.closed_files, "snapshots": self.snapshots,
                "open": list(self.open)}

    @classmethod
    def from_state(cls, layout: SnapshotLayout, state: dict) -> Schedule:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"schedule state lacks {', '.join(missing)}")
        segments = [Segment(int(s["from_step"]), None if s["every"] is None else int(s["every"]))
                    for s in state["segments"]]
        if not segments:
            raise ValueError("schedule state has no interval")
        return cls(layout, segments, int(state["stride"]), int(state["last_step"]), int(state["closed_bytes"]),
                   int(state["closed_files"]), int(state["snapshots"]), [int(s) for s in state["open"]])


def series_bytes(layout: SnapshotLayout, steps: int, every: int, start_step: int = 0) -> int:
    """Exact bytes of a fresh series snapshotting every ``every`` steps after ``start_step`` up to ``steps``."""
    return files_bytes(layout, every, future_labels(start_step, steps, every, 1))


def _regular_floor(layout: SnapshotLayout, last: int, spacing: int, count: int) -> int:
    """Bytes of ``count`` snapshots at ``last + 1 + i * spacing``: a floor for any interval >= spacing."""
    return files_bytes(layout, spacing, Labels(count, last + 1, spacing)) if count > 0 else 0


def solve_interval(schedule: Schedule, final_step: int, budget_bytes: int, at_least: int | None = None) -> int | None:
    """Smallest interval ``>= at_least`` (default: the current one) whose whole series fits ``budget_bytes``.

    The interval changes from the next step on. At least one more snapshot must
    be due, else ``None`` (not even one snapshot fits). Exact: the total is not
    monotone in the interval (header digits grow with the steps), so the search
    is a branch and bound over intervals with a floor that is exact for narrow
    ranges (:func:`_regular_floor`); any ``final_step`` answers in milliseconds.
    """
    current = schedule.every if schedule.every is not None else schedule.interval
    lowest = max(current, at_least or current)
    span = final_step - schedule.last_step
    if span <= 0:
        return lowest

    def exact(k: int) -> int | None:
        if k == schedule.every:
            trial = schedule
        else:
            trial = schedule.with_interval(k)
        if trial.future(final_step).count == 0:
            return None
        return trial.projected_bytes(final_step)

    def fits(k: int) -> bool:
        total = exact(k)
        return total is not None and total <= budget_bytes

    lo = lowest
    if lo == schedule.every:  # continuing the open file is not a fresh segment: check it on its own
        if fits(lo):
            return lo
        lo += 1
    past = schedule.closed_bytes + (schedule.layout.file_bytes_for(schedule.open, schedule._open_every())
                                    if schedule.open else 0)
    stride = max(1, schedule.stride)
    hi = max(lo, final_step)
    stack = [(lo, hi)]
    while stack:  # depth first, left first: the first fit found is the smallest
        a, b = stack.pop()
        if past + _regular_floor(schedule.layout, schedule.last_step, a, span // max(b, stride)) > budget_bytes:
            continue
        if b - a < 8:
            for k in range(a, b + 1):
                if fits(k):
                    return k
            continue
        mid = (a + b) // 2
        stack.append((mid + 1, b))
        stack.append((a, mid))
    return None
