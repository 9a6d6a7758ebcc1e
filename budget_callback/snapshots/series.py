"""The snapshot series and its one owner: identity, layout, schedule and the files on disk.

A :class:`Series` knows the run that writes it (a run id), the file layout,
the interval schedule (one history, from which projected bytes, "paused" and
the manifest are derived) and the files it has on disk. ``manifest.json`` and
the callback's checkpoint state are both written from it, so they cannot
disagree.

:func:`prepare` decides, reading only, what opening a directory for a fit
means: a new series, the continuation of the series a checkpoint belongs to,
or a refusal that says what to do. :meth:`SeriesPlan.commit` then applies the
edits it planned (cut what a crashed run wrote after its checkpoint, clean
temporaries) and starts the series.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..units import format_bytes
from .directory import (DirectoryScan, Edit, SnapshotFile, apply_edits, atomic_write_bytes, clean_temporaries,
                        is_disk_full, plan_removal, plan_truncation, scan)
from .format import MANIFEST, SNAPSHOT_FORMAT, SnapshotLayout, snapshot_name
from .schedule import Placement, Schedule, Segment

STATE_VERSION = 2
# constructor arguments a resumed series must keep, with the layout field that stores each
LAYOUT_ARGUMENTS = {"snapshot_dtype": "dtype", "snapshots_per_file": "snapshots_per_file",
                    "include_embedding": "include_embedding"}


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


class Series:
    """A snapshot series being written. Thread-safe: the writer thread records files, training places them."""

    def __init__(self, directory: Path, layout: SnapshotLayout, run_id: str, schedule: Schedule,
                 files: dict[int, tuple[int, int]] | None = None, launch_token: str | None = None,
                 fsync: bool = True, requested_every: int | None = None) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.run_id = run_id
        self.schedule = schedule
        self.launch_token = launch_token
        self.fsync = fsync
        self.requested_every = requested_every  # the interval asked for (a resume that asks another gets it)
        self._before: dict | None = None  # the schedule's state before the batch end being recorded
        self.files: dict[int, tuple[int, int]] = dict(files or {})  # first step -> (snapshots, bytes) on disk
        self.dropped = 0
        self.lost = 0  # snapshots lost to a full disk
        self.missing = 0  # snapshots whose file something else removed or changed (seen at checkpoints and the end)
        self.overflowed = 0  # float16 snapshots holding +-inf: W had values beyond float16's range (|w| > 65,504)
        self.events: list[dict] = []
        self.summary: dict = {}  # figures added at the end of the fit (projected bytes, forecast)
        self._lock = threading.RLock()

    # --- derived -------------------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        with self._lock:
            return sum(size for _, size in self.files.values())

    def figures(self) -> dict:
        """What the end-of-fit line says, as plain values (shared with the other ranks)."""
        with self._lock:
            return {"bytes_written": sum(size for _, size in self.files.values()), "files": len(self.files),
                    "dropped": self.dropped, "lost": self.lost, "missing": self.missing}

    @property
    def snapshots_on_disk(self) -> int:
        with self._lock:
            return sum(count for count, _ in self.files.values())

    # --- training thread ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A batch end is being recorded: until :meth:`end_step`, a checkpoint (a signal handler's, or one written
        after an exception in between) carries the series as it was before it. The model such a checkpoint holds
        is W after that batch's optimizer step: the resume takes the snapshot again from it."""
        with self._lock:
            self._before = self.schedule.state()

    def end_step(self) -> None:
        with self._lock:
            self._before = None

    def place(self, step: int) -> Placement | None:
        with self._lock:
            return self.schedule.advance(step)

    def change_interval(self, every: int | None) -> None:
        with self._lock:
            self.schedule.change_interval(every)

    def event(self, event: dict) -> None:
        with self._lock:
            self.events.append(dict(event))

    def record_dropped(self, step: int, reason: str = "every host buffer waits for the writer") -> None:
        with self._lock:
            self.dropped += 1
            self.events.append({"step": step, "event": "dropped", "reason": reason})

    # --- writer thread ------------------------------------------------------------------------------
    def record_file(self, first_step: int, count: int, size: int) -> None:
        """A file is on disk (new, or a stacked file rewritten with more snapshots)."""
        with self._lock:
            self.files[first_step] = (count, size)

    def record_overflow(self, step: int, values: int) -> None:
        """A float16 snapshot holds ``values`` infinities (the event once: the count is in the manifest)."""
        with self._lock:
            self.overflowed += 1
            if self.overflowed == 1:
                self.events.append({"step": step, "event": "float16_overflow", "values": values})

    def record_lost(self, steps: list[int], reason: str) -> None:
        with self._lock:
            self.lost += len(steps)
            self.events.append({"step": steps[0], "event": "disk_full", "reason": reason, "snapshots": len(steps)})

    def check_files(self) -> list[str]:
        """Stat every file the series has on disk (the writer idle); one removed or changed by something else is
        no longer counted: its snapshots are lost. Returns the names of those files, with what was found."""
        gone = []
        with self._lock:
            for first, (count, size) in list(self.files.items()):
                path = self.directory / snapshot_name(first)
                try:
                    found = os.stat(path).st_size
                except FileNotFoundError:
                    found = None
                if found == size:
                    continue
                del self.files[first]
                self.missing += count
                gone.append(f"{path.name} ({'missing' if found is None else f'{found:,} B, written {size:,} B'})")
            if gone:
                self.events.append({"step": self.schedule.last_step, "event": "files_missing",
                                    "files": gone[:10], "count": len(gone)})
        return gone

    # --- plain state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The callback's checkpoint state: small and plain. It agrees with the files whenever it is taken: in the
        middle of a batch end (:meth:`begin_step`) it is the series before that batch end."""
        with self._lock:
            on_disk = sum(size for _, size in self.files.values())
            schedule = self.schedule.state()
            if self._before is not None:
                schedule = self._before  # a file of the unfinished batch end may already be there: not counted
                on_disk = min(on_disk, Schedule.from_state(self.layout, schedule).due_bytes())
            return {"version": STATE_VERSION, "run_id": self.run_id, "snapshot_dir": str(self.directory),
                    "layout": self.layout.to_dict(), "schedule": schedule, "bytes_on_disk": on_disk,
                    "files_on_disk": len(self.files), "requested_every": self.requested_every}

    def manifest(self, status: str = "running") -> dict:
        with self._lock:
            s = self.schedule
            return {
                "format": SNAPSHOT_FORMAT,
                "run_id": self.run_id,
                "status": status,
                "launch_token": self.launch_token,
                **self.layout.to_dict(),
                "intervals": s.history(),
                "save_every_n_steps": s.interval,
                "paused": s.paused,
                "last_step": s.last_step,
                "files_written": len(self.files),
                "bytes_written": sum(size for _, size in self.files.values()),
                "snapshots_dropped": self.dropped,
                "snapshots_lost": self.lost,
                "snapshots_missing": self.missing,
                "snapshots_float16_overflow": self.overflowed,
                "events": list(self.events),
                **self.summary,
            }

    def write_manifest(self, status: str = "running") -> bool:
        """Write ``manifest.json`` atomically. A full disk keeps the previous one (counted as an event):
        the files themselves say what they hold, and a resume rebuilds from them."""
        data = json.dumps(self.manifest(status), indent=1).encode()
        try:
            atomic_write_bytes(self.directory / MANIFEST, data, self.fsync)
        except OSError as err:
            if not is_disk_full(err):
                raise
            self.event({"step": self.schedule.last_step, "event": "disk_full", "reason": "manifest not updated"})
            return False
        return True


# --- opening a directory for a fit --------------------------------------------------------------------
def restored_series(state: dict | None) -> dict | None:
    """The series part of a checkpoint state, or None when the state has none (a fresh callback's state,
    e.g. the temporary checkpoint Lightning's lr_find or batch-size scaling restores)."""
    if not state:
        return None
    if int(state.get("version", 1)) >= 2:
        return state if state.get("run_id") else None
    if "global_step" in state and "save_every_n_steps" in state:  # version 1: before run ids
        return state
    return None


@dataclass
class SeriesPlan:
    """What opening ``directory`` for this fit will do; nothing has been touched yet."""

    directory: Path
    layout: SnapshotLayout
    found: DirectoryScan
    run_id: str
    schedule: Schedule | None  # the restored schedule when resuming; None: a new series
    edits: list[Edit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def resuming(self) -> bool:
        return self.schedule is not None

    @property
    def reclaimable_bytes(self) -> int:
        """Bytes on disk this series will own or free: free space plus these is its room."""
        return self.found.series_bytes

    def kept_files(self) -> list[SnapshotFile]:
        gone = {e.path for e in self.edits if e.keep == 0}
        return [f for f in self.found.files if f.path not in gone]

    def check_room(self, free_bytes: int) -> None:
        """A resume cuts stacked files back to its checkpoint: each new copy is written while the old one is still
        there. Refuse, before anything is touched, when the disk cannot hold the largest one after the deletions."""
        by_path = {f.path: f for f in self.found.files}
        cuts = [(e.path, _cut_size(self.layout, by_path[e.path], e.keep)) for e in self.edits if e.keep]
        if not cuts:
            return
        room = free_bytes + sum(e.bytes_before for e in self.edits if e.keep == 0)
        path, need = max(cuts, key=lambda c: c[1])
        if need > room:
            raise OSError(errno.ENOSPC, (
                f"budget-callback: resuming needs {format_bytes(need)} ({need:,} B) free in {str(self.directory)!r} "
                f"to cut {path.name} back to the checkpoint's step (its old copy stays until the new one is "
                f"complete), and {format_bytes(room)} ({room:,} B) is free once the snapshots written after the "
                f"checkpoint are removed. Free at least {format_bytes(need - room)} on that file system and resume "
                "again; nothing was touched"))

    def commit(self, schedule: Schedule, launch_token: str | None = None, fsync: bool = True,
               requested_every: int | None = None) -> tuple[Series, list[str], SnapshotFile | None]:
        """Apply the planned edits, clean temporaries, start the series and write its manifest.

        Returns the series, the names of the temporaries removed, and the open stacked file
        to continue (its snapshots are the schedule's open ones), if any.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.check_room(shutil.disk_usage(self.directory).free + sum(p.stat().st_size for p in self.found.temporaries
                                                                    if p.exists()))
        removed = clean_temporaries(self.found)
        apply_edits(sorted(self.edits, key=lambda e: e.keep != 0), self.found, self.layout, fsync)  # deletions first
        after = scan(self.directory) if self.edits else self.found
        files = {f.first_step: (f.count, f.size) for f in after.files} if self.resuming else {}
        series = Series(self.directory, self.layout, self.run_id, schedule, files, launch_token, fsync, requested_every)
        open_file = None
        if schedule.open:
            open_file = next((f for f in after.files if f.first_step == schedule.open[0]
                              and list(f.steps) == schedule.open), None)
        series.write_manifest()
        return series, removed, open_file


def prepare(directory: Path, layout: SnapshotLayout, restored: dict | None, overwrite: bool,
            checkpoint_hint: str = "", run_id: str | None = None, own_run_id: str | None = None,
            asked_every: int | None = None) -> SeriesPlan:
    """Decide what this fit does with ``directory`` (reading only); refuse with what to do instead.

    ``restored``: the series state from the checkpoint being resumed (see :func:`restored_series`).
    ``checkpoint_hint``: words about the checkpoint for messages (e.g. which snapshot_dir it knows).
    ``run_id``: the id of a new series (default: a fresh one). ``own_run_id``: the run the checkpoint being
    resumed belongs to when it was written before that run's series started (its snapshots are all later
    than the checkpoint: replaced, as a resume replaces what came after its checkpoint). ``asked_every``: the
    interval this fit asks for (see :func:`_ask_interval`).
    """
    directory = Path(directory)
    found = scan(directory)
    if found.foreign_manifest is not None:
        raise ValueError(
            f"`snapshot_dir` {str(directory)!r} holds a {MANIFEST} that budget-callback did not write "
            f"({found.foreign_manifest}); nothing was touched, and overwrite=True does not replace files this "
            "callback did not write. Choose another snapshot_dir, or move that file away")
    if restored is None:
        return _fresh(directory, layout, found, overwrite, checkpoint_hint, run_id or new_run_id(), own_run_id)
    plan = _resume(directory, layout, found, restored, overwrite)
    if plan.resuming and asked_every is not None:
        _ask_interval(plan, asked_every, restored.get("requested_every"))
    return plan


def _ask_interval(plan: SeriesPlan, asked: int, before: int | None) -> None:
    """A resume that asks for another interval than its series was started with gets it from the resume on (the
    disk is checked again: the forecast may raise it); one that asks the same keeps the series' interval (which the
    disk guard may have raised). A checkpoint that does not say what was asked keeps it, and says so."""
    schedule = plan.schedule
    if before is None:
        if asked != schedule.interval:
            plan.warnings.append(
                f"`save_every_n_steps`={asked}, but the series being resumed snapshots every {schedule.interval} "
                "steps and its checkpoint (written by an earlier version) does not say which interval was "
                f"requested: the series keeps {schedule.interval}")
        return
    if asked != before:
        plan.warnings.append(f"`save_every_n_steps` changed from {before} (requested when the series started) to "
                             f"{asked}: the series snapshots every {asked} steps from step {schedule.last_step + 1} on")
        schedule.change_interval(asked)


def _fresh(directory: Path, layout: SnapshotLayout, found: DirectoryScan, overwrite: bool, hint: str, run_id: str,
           own_run_id: str | None = None) -> SeriesPlan:
    plan = SeriesPlan(directory, layout, found, run_id, None)
    if found.holds_series:
        if not overwrite and not (own_run_id is not None and found.run_id == own_run_id):
            owner = f"run {found.run_id}" if found.run_id else "another run"
            raise ValueError(
                f"`snapshot_dir` {str(directory)!r} already holds snapshots of {owner} "
                f"({len(found.files) + len(found.bad)} file(s)); nothing was touched. Choose another directory, "
                "resume that run with trainer.fit(..., ckpt_path=<its checkpoint>), or pass "
                f"BudgetCallback(overwrite=True) to replace them.{(' ' + hint) if hint else ''}")
        plan.edits = plan_removal(found)
        if found.manifest is not None:
            plan.edits.append(Edit(directory / MANIFEST, 0, 0))
    if found.foreign:
        plan.warnings.append(f"`snapshot_dir` holds other .safetensors files, left alone: "
                             f"{', '.join(p.name for p in found.foreign[:5])}")
    return plan


def _check_layout(layout: SnapshotLayout, saved: dict) -> None:
    for argument, key in LAYOUT_ARGUMENTS.items():
        if key in saved and saved[key] != getattr(layout, key):
            raise ValueError(
                f"`{argument}` is {getattr(layout, key)!r} but the series being resumed was written with "
                f"{argument}={saved[key]!r}; pass {argument}={saved[key]!r} to continue it, or write to another "
                "snapshot_dir")
    for key in ("vocab_size", "hidden_dim"):
        if key in saved and saved[key] != getattr(layout, key):
            raise ValueError(f"W is {layout.vocab_size} x {layout.hidden_dim} but the series being resumed holds "
                             f"{saved['vocab_size']} x {saved['hidden_dim']}: a different model or `unembedding`")


def _resume(directory: Path, layout: SnapshotLayout, found: DirectoryScan, restored: dict,
            overwrite: bool = False) -> SeriesPlan:
    legacy = int(restored.get("version", 1)) < 2
    run_id = found.run_id if legacy else restored["run_id"]
    if not legacy and found.holds_series and found.run_id != run_id:
        owner = f"run {found.run_id}" if found.run_id else "a run whose manifest is missing or from another version"
        if overwrite:  # the user asked to replace another run's snapshots: this run's series starts here, afresh
            plan = _fresh(directory, layout, found, True, "", new_run_id())
            plan.warnings.append(
                f"`snapshot_dir` held snapshots of {owner}, not of run {run_id} that the checkpoint belongs to; "
                "overwrite=True replaced them, and a new series starts at the checkpoint's step (the earlier "
                f"snapshots of run {run_id} are not in this directory)")
            return plan
        raise ValueError(
            f"`snapshot_dir` {str(directory)!r} holds snapshots of {owner}, but the checkpoint being resumed "
            f"belongs to run {run_id}; nothing was touched. Resume from a checkpoint of that run, write to another "
            "snapshot_dir, or pass BudgetCallback(overwrite=True) to replace them.")
    if legacy:
        schedule = _legacy_schedule(layout, restored, found)
    else:
        _check_layout(layout, restored.get("layout", {}))
        schedule = Schedule.from_state(layout, restored["schedule"])
    mismatched = [f.path.name + ": " + why for f in found.files if (why := f.matches(layout))]
    if mismatched:
        raise ValueError(f"snapshot files in {str(directory)!r} do not hold this run's layout "
                         f"({'; '.join(mismatched[:3])}); nothing was touched")
    plan = SeriesPlan(directory, layout, found, run_id or new_run_id(), schedule)
    plan.edits = plan_truncation(found, schedule.last_step)
    kept = plan.kept_files()
    bad = [b for b in found.bad if b.path not in {e.path for e in plan.edits}]
    if bad:
        plan.warnings.append("unreadable snapshot files kept as they are (not part of the series): "
                             + "; ".join(b.line() for b in bad[:5]))
    expected = int(restored.get("bytes_on_disk", 0)) if not legacy else None
    cuts = {e.path: e.keep for e in plan.edits if e.keep}
    have = sum(_cut_size(layout, f, cuts[f.path]) if f.path in cuts else f.size for f in kept)
    if expected is not None and have < expected:
        plan.warnings.append(f"the checkpoint's series had {expected:,} B on disk at step {schedule.last_step}, "
                             f"{have:,} B are there: some snapshots are missing; the series goes on without them")
    return plan


def _cut_size(layout: SnapshotLayout, f: SnapshotFile, keep: int) -> int:
    return layout.file_bytes_for(list(f.steps[:keep]), f.every)


def _legacy_schedule(layout: SnapshotLayout, state: dict, found: DirectoryScan) -> Schedule:
    """A version-1 checkpoint (before run ids): intervals and step, files as they are on disk."""
    last = int(state["global_step"])
    intervals = state.get("intervals") or (found.manifest or {}).get("intervals") or \
        [{"from_step": 1, "every": int(state["save_every_n_steps"])}]
    segments = [Segment(int(i["from_step"]), int(i["every"])) for i in intervals]
    schedule = Schedule(layout, segments, 1, last)
    for f in found.files:
        steps = [s for s in f.steps if s <= last]
        if steps:
            schedule.closed_bytes += layout.file_bytes_for(steps, f.every)
            schedule.closed_files += 1
            schedule.snapshots += len(steps)
    return schedule
