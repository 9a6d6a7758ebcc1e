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
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import SnapshotDirInUseError
from . import osio
from .format import (ITEMSIZE, LOCK_FILE, MANIFEST, SNAPSHOT_FORMAT, SnapshotLayout, encode_header, is_temporary,
                     step_of_name, temporary_name)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_FORMAT_FAMILY = SNAPSHOT_FORMAT.split("/")[0]


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
class SnapshotFile(NamedTuple):
    """A valid snapshot file: its steps, layout and where each tensor's data starts.

    A named tuple (immutable), made cheaply: a scan makes one per file. ``tensors`` is shared, read-only, by the
    files of a series whose tensor headers are the same bytes."""

    location: str  # the file's path (``path`` makes the Path when asked)
    first_step: int
    steps: tuple[int, ...]
    every: int
    size: int
    data_start: int  # 8 + header length
    tensors: dict  # name -> {"dtype": code, "shape": [...], "data_offsets": [a, b]}
    header: bytes = b""  # the 8-byte length and the header as read: a file opened later must still start so

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def name(self) -> str:
        return os.path.basename(self.location)

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


_HEAD_BYTES = 1024  # read at once: the length and the header of a snapshot file of a few tensors (else a 2nd read)
# Headers are parsed in two parts: the metadata object, different in every file, and the tensors' part, the same
# bytes in every file of a series, parsed once per scan. The metadata as this package writes it is matched in one
# go; any other order of string values without escapes pair by pair; anything else is parsed as JSON.
_STRING = rb'"[^"\\\x00-\x1f]*"'
_OURS = re.compile(rb'\{"__metadata__":\{"format":"([^"\\\x00-\x1f]*)","first_step":"([0-9]+)","count":"([0-9]+)",'
                   rb'"every":"([0-9]+)"(?:,"steps":"([0-9,]*)")?\},')
_METADATA = re.compile(rb'\{"__metadata__":\{("[A-Za-z_]+":' + _STRING + rb'(?:,"[A-Za-z_]+":' + _STRING + rb')*)?\},')
_PAIR = re.compile(rb'"([A-Za-z_]+)":"([^"\\\x00-\x1f]*)"')
_META_KEYS = ("format", "first_step", "count", "every", "steps")
# A header this package wrote starts so; what follows the first step's digits is the same bytes in every file of
# a series (for steps of as many digits): checked in full once, then compared (see ``_Own``).
_OWN_START = b'{"__metadata__":{"format":"' + SNAPSHOT_FORMAT.encode() + b'","first_step":"'


def _parse_header(raw: bytes, parsed: dict) -> tuple[tuple, dict | None, int | str]:
    """``(metadata, tensors, end of their data or why they are invalid)`` of a header's JSON ``raw``; metadata as
    the values of ``_META_KEYS`` (None where missing); ``tensors`` None when the header is not a JSON object.
    ``parsed`` caches the tensors' part by its bytes."""
    m = _OURS.match(raw)
    if m is not None:
        meta = tuple(v.decode() if v is not None else None for v in m.groups())
    else:
        m = _METADATA.match(raw)
        if m is not None:
            pairs = dict(_PAIR.findall(m.group(1) or b""))
            meta = tuple(pairs[k].decode() if k in pairs else None for k in (k.encode() for k in _META_KEYS))
    if m is not None:
        rest = raw[m.end() - 1:].rstrip(b" ")
        known = parsed.get(rest)
        if known is None:
            tensors = json.loads(b"{" + rest[1:])
            known = parsed[rest] = (*_check_tensors(tensors), "__metadata__" not in tensors)
        if known[2]:  # a second "__metadata__" (JSON keeps the last): parsed whole below
            return meta, known[0], known[1]
    header = json.loads(raw)
    if not isinstance(header, dict):
        return (None,) * len(_META_KEYS), None, 0
    given = header.pop("__metadata__", None)
    given = given if isinstance(given, dict) else {}
    return tuple(given.get(k) for k in _META_KEYS), *_check_tensors(header)


def _check_tensors(tensors: dict) -> tuple[dict, int | str]:
    """``(tensors, end of their data)``, or ``(tensors, why they are invalid)``."""
    end = 0
    for name, info in tensors.items():
        try:
            n = ITEMSIZE[info["dtype"]]
            for dim in info["shape"]:
                n *= int(dim)
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return tensors, f"tensor {name!r} has an invalid entry"
        if b - a != n:
            return tensors, f"tensor {name!r}: offsets do not match its shape"
        end = max(end, b)
    return tensors, end


def read_snapshot_file(path: Path | str) -> SnapshotFile | BadFile:
    """Parse and check one file's header against its size, without reading its data."""
    location = os.fspath(path)
    return _Headers(os.path.dirname(location)).read_all([(os.path.basename(location),
                                                          step_of_name(os.path.basename(location)))])[0]


class _Own(NamedTuple):
    """A header of ours checked in full, all but its first step: the bytes that follow the step's digits, and what
    they mean. Another file whose first bytes are the same but for the step, and of the same size, is as valid."""

    start: bytes  # the 8-byte header length and the JSON up to the first step's digits
    rest: bytes  # what follows the digits, padding included
    size: int  # the file's size
    every: int
    steps: tuple[int, ...]  # the steps after the first, relative to it
    tensors: dict
    data_start: int


class _Headers:
    """Reads the headers of a directory's files: one open (relative to the directory where ``os.open`` takes a
    ``dir_fd``), one ``lseek`` (the size) and one read of the first 1 KiB each (a longer header takes a second
    read), the calls looked up once per scan. A header is checked in full the first time its kind is met (see
    :class:`_Own`); the next files of a series are compared with it byte for byte: a series' headers are read at
    little more than the cost of those system calls. No ``fstat``: which file it was is told by its size and
    header bytes (``SnapshotFile.header``), which the reader compares when it first opens the file again."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.flags = osio.open_flags(os.O_RDONLY)
        self.read_at = getattr(os, "pread", None) or osio.read_at
        self.parsed: dict = {}  # the tensors' part of a header -> (tensors, end or why invalid, no 2nd metadata)
        self.own: dict[int, _Own] = {}  # digits of the first step -> the last header of ours checked in full

    def read_all(self, named_files) -> list[SnapshotFile | BadFile]:
        """The files of ``(name, step the name stands for or None)`` pairs, in order."""
        base = os.path.join(self.directory, "")
        relative = os.open in os.supports_dir_fd and os.path.isdir(self.directory)
        dir_fd = os.open(self.directory, osio.open_flags(os.O_RDONLY)) if relative else None
        try:
            return self._read_all(named_files, base, dir_fd)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)

    def _read_all(self, named_files, base: str, dir_fd: int | None) -> list[SnapshotFile | BadFile]:
        out: list[SnapshotFile | BadFile] = []
        append, own, flags, read_at, make = out.append, self.own, self.flags, self.read_at, SnapshotFile._make
        do_open, do_seek, do_close, end = os.open, os.lseek, os.close, os.SEEK_END
        for name, named in named_files:
            try:
                fd = do_open(name, flags, dir_fd=dir_fd) if dir_fd is not None else do_open(base + name, flags)
                try:
                    size = do_seek(fd, 0, end)
                    head = read_at(fd, _HEAD_BYTES, 0)
                    if named is not None:  # the same header as the last of ours checked in full, but for the step?
                        digits = b"%d" % named
                        known = own.get(len(digits))
                        if known is not None and size == known.size and \
                                head.startswith(header := known.start + digits + known.rest):
                            append(make((base + name, named, (named,) if not known.steps else
                                         (named, *(named + s for s in known.steps)), known.every, size,
                                         known.data_start, known.tensors, header)))
                            continue
                    length = struct.unpack_from("<Q", head)[0] if len(head) >= 8 else -1
                    if len(head) < 8 + length <= min(MAX_HEADER_BYTES, size):  # a longer header
                        head += read_at(fd, 8 + length - len(head), len(head))
                finally:
                    do_close(fd)
            except OSError as err:
                append(BadFile(Path(base + name), f"unreadable ({err.strerror})"))
                continue
            append(self._check(base + name, named, size, head))  # the full check, which says why when it fails
        return out

    def _learn(self, raw: bytes, f: SnapshotFile) -> None:
        """Remember ``f``'s header (``raw``, checked in full) for the next files, when nothing in it but the first
        step's digits depends on the step: the metadata as this package writes it (no listed steps, which
        are each file's own, and no second metadata object, which JSON would read instead)."""
        m = _OURS.match(raw)
        if m is None or m.group(5) is not None or b"__metadata__" in raw[m.end():]:
            return
        digits = m.group(2)
        if digits != b"%d" % f.first_step or f.steps != tuple(f.first_step + i * f.every for i in range(f.count)):
            return
        self.own[len(digits)] = _Own(struct.pack("<Q", len(raw)) + _OWN_START, raw[len(_OWN_START) + len(digits):],
                                     f.size, f.every, tuple(i * f.every for i in range(1, f.count)), f.tensors,
                                     f.data_start)

    def _check(self, location: str, named: int | None, size: int, head: bytes) -> SnapshotFile | BadFile:
        """The full check of a header (``head``: the file's first bytes, the whole header if it fits the file)
        against the file's ``size`` and name; a valid header of ours teaches ``own``."""
        if len(head) < 8:
            return BadFile(Path(location), f"{size} B: shorter than the 8-byte header length (truncated)")
        (length,) = struct.unpack_from("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            return BadFile(Path(location), f"header length {length:,} B does not fit the {size:,} B file (truncated "
                                           "or not safetensors)")
        raw = head[8:8 + length]
        try:
            (fmt, first, count, every, listed), tensors, end = _parse_header(raw, self.parsed)
        except (ValueError, UnicodeDecodeError):
            return BadFile(Path(location), "header is not valid JSON (not safetensors)")
        if tensors is None:
            return BadFile(Path(location), "header is not a JSON object (not safetensors)")
        if isinstance(end, str):
            return BadFile(Path(location), end)
        data = size - 8 - length
        if data != end:
            return BadFile(Path(location), f"{data:,} B of data, the header describes {end:,} B (truncated)")
        if not str(fmt or "").startswith(_FORMAT_FAMILY) or "unembedding" not in tensors:
            return BadFile(Path(location), "not a budget-callback snapshot (no 'budget-callback' format metadata)")
        try:
            first, count, every = int(first), int(count), int(every)
            steps = tuple(int(x) for x in listed.split(",")) if listed else \
                tuple(first + i * every for i in range(count)) if count != 1 else (first,)
        except (TypeError, ValueError, AttributeError):
            return BadFile(Path(location), "snapshot metadata (first_step, count, every) is invalid")
        if len(steps) != count or not count or steps[0] != first or named not in (None, first):
            return BadFile(Path(location), f"metadata steps do not match the file name (first_step {first}, count "
                                           f"{count})")
        shape = tensors["unembedding"]["shape"]
        if len(shape) == 3 and shape[0] != count:
            return BadFile(Path(location), f"holds {shape[0]} stacked snapshots, metadata says {count}")
        found = SnapshotFile(location, first, steps, every, size, 8 + length, tensors, head[:8 + length])
        if raw.startswith(_OWN_START):
            self._learn(raw, found)
        return found


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
    snapshots = []
    for name in sorted(os.listdir(directory)):
        named = step_of_name(name)
        if named is not None:
            snapshots.append((name, named))
        elif is_temporary(name):
            result.temporaries.append(directory / name)
        elif name == MANIFEST:
            try:
                result.manifest = json.loads((directory / name).read_text())
                if not isinstance(result.manifest, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as err:
                result.manifest, result.manifest_error = {}, f"{MANIFEST} is unreadable ({err})"
        elif name.endswith(".safetensors"):
            result.foreign.append(directory / name)
    for parsed in _Headers(str(directory)).read_all(snapshots):
        (result.files if type(parsed) is SnapshotFile else result.bad).append(parsed)
    files = result.files
    if any(a.first_step > b.first_step for a, b in zip(files, files[1:])):  # names of more than 9 digits
        files.sort(key=lambda f: f.first_step)
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
