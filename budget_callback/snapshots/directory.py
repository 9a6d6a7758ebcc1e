"""The snapshot directory on disk: its lock, what is in it, and the edits a resume makes (no torch).

Reading never trusts a file: :func:`scan` checks every header against the
file's size, so a stray, foreign or truncated file is reported by name and
never hides the valid snapshots. Editing is planned first and applied after:
a resume validates everything before it deletes anything.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SnapshotDirInUseError
from . import osio
from .format import (ITEMSIZE, LOCK_FILE, MANIFEST, SNAPSHOT_FORMAT, SnapshotLayout, encode_header, is_temporary,
                     step_of_name, temporary_name)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, from Python or from safetensors' Rust writer (``SafetensorError: ... (os error 28)``)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return f"os error {errno.ENOSPC})" in text or f"os error {errno.EDQUOT})" in text


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary in the same directory and a rename."""
    tmp = path.with_name(temporary_name(path.name, os.getpid()))
    try:
        with open(tmp, "wb") as fh:  # binary: no newline translation anywhere
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


# --- the lock ---------------------------------------------------------------------------------
class DirectoryLock:
    """An exclusive lock on ``<dir>/.budget-callback.lock`` for the whole fit.

    Where ``fcntl`` exists (Linux, macOS, every POSIX system) it is ``fcntl.flock`` on that file: the
    kernel releases it when the holder dies, however it dies. Elsewhere (Windows) the lock is the file
    itself, created exclusively (``O_EXCL``); a file left by a holder that died is taken over when its
    holder ran on this host and its pid is known to run no more (not on Windows, where a process cannot
    be asked safely); otherwise the refusal names the file to remove.

    The file names its holder (pid, host, start time, command) so a refused run can say who has the
    directory. It is removed on release, and acquisition checks that the locked file is still the one at
    the path (a holder that released and removed it in between cannot leave two holders).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False
        self._exclusive_file = False  # True: the lock is the file itself (no flock here)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run: str = "") -> None:
        if self._fd is not None:
            return
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        fcntl = osio.module("fcntl")
        fd = self._flock(fcntl) if fcntl is not None else self._create_exclusively()
        self._exclusive_file = fcntl is None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "run": run,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:200]}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(holder).encode())
        except OSError as err:
            os.close(fd)
            if self._exclusive_file:
                self.path.unlink(missing_ok=True)
            if not is_disk_full(err):
                raise
            raise OSError(err.errno, f"budget-callback: no space left in {str(self.directory)!r} for its lock file "
                                     f"({LOCK_FILE}, a few hundred bytes): free some space on that file system "
                                     "and start again") from err
        self._fd = fd

    def _flock(self, fcntl) -> int:
        while True:
            fd = os.open(self.path, osio.open_flags(os.O_RDWR | os.O_CREAT), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._in_use() from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the file was removed by a holder releasing it: take the new one

    def _create_exclusively(self) -> int:
        while True:
            try:
                return os.open(self.path, osio.open_flags(os.O_RDWR | os.O_CREAT | os.O_EXCL), 0o644)
            except FileExistsError:
                pass
            try:
                text = self.path.read_bytes()
            except FileNotFoundError:  # released in between: try again
                continue
            if not self._dead_holder(text):
                raise self._in_use(f"; if no fit runs there, remove {str(self.path)!r}") from None
            self._take_over(text)

    def _dead_holder(self, text: bytes) -> bool:
        """The holder in ``text`` ran on this host and its process is gone (an empty file is a holder
        still writing its name: alive)."""
        try:
            h = json.loads(text or b"{}")
        except ValueError:
            return False
        if not isinstance(h, dict) or h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
            return False
        return osio.process_alive(h["pid"]) is False

    def _take_over(self, text: bytes) -> None:
        """Remove the dead holder's file, and only that one: it is moved aside first (one taker moves it) and
        put back if what was moved is not what was judged dead (another taker's fresh lock)."""
        aside = self.path.with_name(temporary_name(LOCK_FILE, os.getpid()))
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_bytes()
        except OSError:
            moved = None
        if moved != text:
            try:
                os.link(aside, self.path)  # back where it was, unless a new holder is there already
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _in_use(self, hint: str = "") -> SnapshotDirInUseError:
        return SnapshotDirInUseError(
            f"`snapshot_dir` {str(self.directory)!r} is in use by another fit ({self._holder()}); two fits "
            f"never write one directory at the same time: wait for it to finish or choose another snapshot_dir{hint}")

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            h = {}
        if not h:
            return "holder unknown"
        return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}: {h.get('command')}"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            ours = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            ours = False
        if self._exclusive_file:  # close first: Windows removes no open file
            os.close(self._fd)
        try:
            if ours:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            if not self._exclusive_file:  # flock: removed while held, so no one locks the old file meanwhile
                os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                self.directory.rmdir()  # only if the fit left nothing in the directory it created
            except OSError:
                pass
            self._created_dir = False


# --- what is in the directory --------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotFile:
    """A valid snapshot file: its steps, layout and where each tensor's data starts."""

    path: Path
    first_step: int
    steps: tuple[int, ...]
    every: int
    size: int
    data_start: int  # 8 + header length
    tensors: dict  # name -> {"dtype": code, "shape": [...], "data_offsets": [a, b]}

    @property
    def count(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int:
        return self.steps[-1]

    @property
    def stacked(self) -> bool:
        return len(self.tensors["unembedding"]["shape"]) == 3

    def matches(self, layout: SnapshotLayout) -> str | None:
        """Why this file does not hold ``layout``'s tensors; None when it does."""
        want = layout.tensors(self.count)
        got = {n: (t["dtype"], tuple(t["shape"])) for n, t in self.tensors.items()}
        return None if got == want else f"holds {got}, expected {want}"


@dataclass(frozen=True)
class BadFile:
    path: Path
    reason: str

    def line(self) -> str:
        return f"{self.path.name}: {self.reason}"


def read_snapshot_file(path: Path) -> SnapshotFile | BadFile:
    """Parse and check one file's header against its size, without reading its data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return BadFile(path, f"{size} B: shorter than the 8-byte header length (truncated)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                return BadFile(path, f"header length {length:,} B does not fit the {size:,} B file (truncated or "
                                     "not safetensors)")
            header = json.loads(fh.read(length))
    except OSError as err:
        return BadFile(path, f"unreadable ({err.strerror})")
    except (ValueError, UnicodeDecodeError):
        return BadFile(path, "header is not valid JSON (not safetensors)")
    if not isinstance(header, dict):
        return BadFile(path, "header is not a JSON object (not safetensors)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            n = ITEMSIZE[info["dtype"]]
            for dim in info["shape"]:
                n *= int(dim)
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return BadFile(path, f"tensor {name!r} has an invalid entry")
        if b - a != n:
            return BadFile(path, f"tensor {name!r}: offsets do not match its shape")
        end = max(end, b)
    data = size - 8 - length
    if data != end:
        return BadFile(path, f"{data:,} B of data, the header describes {end:,} B (truncated)")
    if not str(meta.get("format", "")).startswith(SNAPSHOT_FORMAT.split("/")[0]) or "unembedding" not in header:
        return BadFile(path, "not a budget-callback snapshot (no 'budget-callback' format metadata)")
    try:
        first, count, every = int(meta["first_step"]), int(meta["count"]), int(meta["every"])
        steps = tuple(int(x) for x in meta["steps"].split(",")) if meta.get("steps") else \
            tuple(first + i * every for i in range(count))
    except (KeyError, ValueError):
        return BadFile(path, "snapshot metadata (first_step, count, every) is invalid")
    if len(steps) != count or steps[0] != first or step_of_name(path.name) not in (None, first):
        return BadFile(path, f"metadata steps do not match the file name (first_step {first}, count {count})")
    shape = header["unembedding"]["shape"]
    if len(shape) == 3 and shape[0] != count:
        return BadFile(path, f"holds {shape[0]} stacked snapshots, metadata says {count}")
    return SnapshotFile(path, first, steps, every, size, 8 + length, header)


@dataclass
class DirectoryScan:
    """Everything in a snapshot directory, sorted out. Reading only."""

    directory: Path
    files: list[SnapshotFile] = field(default_factory=list)  # valid snapshot files, by first step
    bad: list[BadFile] = field(default_factory=list)  # snapshot names that do not read as snapshots
    foreign: list[Path] = field(default_factory=list)  # other *.safetensors files: never touched
    temporaries: list[Path] = field(default_factory=list)
    manifest: dict | None = None
    manifest_error: str | None = None

    @property
    def foreign_manifest(self) -> str | None:
        """What the ``manifest.json`` here is when budget-callback did not write it (None: ours, or none)."""
        m = self.manifest
        if not m or str(m.get("format", "")).startswith(SNAPSHOT_FORMAT.split("/")[0]):
            return None
        keys = ", ".join(sorted(map(str, m))[:4])
        return f"a JSON object with {keys}{' ...' if len(m) > 4 else ''}, no budget-callback format"

    @property
    def holds_series(self) -> bool:
        return bool(self.files or self.bad or (self.manifest is not None and self.foreign_manifest is None))

    @property
    def series_bytes(self) -> int:
        """Bytes of every file that belongs to a series here (valid or not): what a new series may reclaim."""
        total = sum(f.size for f in self.files)
        for bad in self.bad:
            try:
                total += bad.path.stat().st_size
            except OSError:
                pass
        return total

    @property
    def run_id(self) -> str | None:
        return (self.manifest or {}).get("run_id")


def scan(directory: Path) -> DirectoryScan:
    directory = Path(directory)
    result = DirectoryScan(directory)
    if not directory.is_dir():
        return result
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if is_temporary(name):
            result.temporaries.append(Path(entry.path))
        elif name == MANIFEST:
            try:
                result.manifest = json.loads(Path(entry.path).read_text())
                if not isinstance(result.manifest, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as err:
                result.manifest, result.manifest_error = {}, f"{MANIFEST} is unreadable ({err})"
        elif step_of_name(name) is not None:
            parsed = read_snapshot_file(Path(entry.path))
            (result.files if isinstance(parsed, SnapshotFile) else result.bad).append(parsed)
        elif name.endswith(".safetensors"):
            result.foreign.append(Path(entry.path))
    result.files.sort(key=lambda f: f.first_step)
    return result


def clean_temporaries(found: DirectoryScan) -> list[str]:
    """Remove the temporaries a killed writer left (ours and safetensors' own); return their names."""
    removed = []
    for path in found.temporaries:
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


# --- resume edits --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """Delete a file, or cut a stacked file down to its first ``keep`` snapshots."""

    path: Path
    keep: int  # 0: delete
    bytes_before: int


def plan_truncation(found: DirectoryScan, step: int) -> list[Edit]:
    """The edits that leave only snapshots at or before ``step`` (a resumed run writes the rest again)."""
    edits = []
    for f in found.files:
        if f.first_step > step:
            edits.append(Edit(f.path, 0, f.size))
        elif f.last_step > step:
            edits.append(Edit(f.path, sum(1 for s in f.steps if s <= step), f.size))
    for bad in found.bad:
        first = step_of_name(bad.path.name)
        if first is not None and first > step:
            edits.append(Edit(bad.path, 0, 0))
    return edits


def plan_removal(found: DirectoryScan) -> list[Edit]:
    """The edits that remove a series (``overwrite=True``): every snapshot file, valid or not."""
    return [Edit(f.path, 0, f.size) for f in found.files] + [Edit(b.path, 0, 0) for b in found.bad]


def apply_edits(edits: list[Edit], found: DirectoryScan, layout: SnapshotLayout, fsync: bool = True) -> None:
    by_path = {f.path: f for f in found.files}
    for edit in edits:
        if edit.keep == 0:
            edit.path.unlink(missing_ok=True)
        else:
            cut_stacked(by_path[edit.path], edit.keep, layout, fsync)
    if edits and fsync:
        fsync_dir(found.directory)


def cut_stacked(f: SnapshotFile, keep: int, layout: SnapshotLayout, fsync: bool = True) -> int:
    """Rewrite a stacked file with its first ``keep`` snapshots only (atomically); return its new size."""
    steps = list(f.steps[:keep])
    names = sorted(f.tensors)
    shapes = {n: (f.tensors[n]["dtype"], (keep, *f.tensors[n]["shape"][1:])) for n in names}
    header = encode_header(shapes, layout.metadata(steps[0], keep, f.every, steps))
    with open(f.path, "rb") as fh:
        parts = []
        for n in names:
            a, b = f.tensors[n]["data_offsets"]
            per = (b - a) // f.count
            fh.seek(f.data_start + a)
            parts.append(fh.read(per * keep))
    atomic_write_bytes(f.path, header + b"".join(parts), fsync)
    return f.path.stat().st_size
