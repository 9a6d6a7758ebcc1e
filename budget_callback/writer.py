"""Background snapshot writer: bounded queue, atomic files, a small manifest.

The training thread hands over host copies of W (and E); one thread writes
them as safetensors files. Every file and the manifest appear atomically
(temporary name in the same directory, fsync, rename, fsync of the directory),
so a reader never sees a partial file. A disk-full error (ENOSPC) loses only
the snapshot being written; any other error stops the writer and is raised in
the training process at the next step.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .validate import one_of
from .errors import SnapshotWriteError
from .storage import SNAPSHOT_FORMAT, SnapshotLayout

MANIFEST = "manifest.json"
_FLUSH, _FLUSH_KEEP = -1, -2  # queue markers: close the open stack / write it but keep it open
TMP_MARK = ".tmp-"
WHEN_BEHIND = ("wait", "drop")


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, from Python or from safetensors' Rust writer (``SafetensorError: ... (os error 28)``)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return f"os error {errno.ENOSPC})" in text or f"os error {errno.EDQUOT})" in text


def snapshot_name(first_step: int) -> str:
    return f"step_{first_step:09d}.safetensors"


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def clean_temporaries(directory: Path) -> list[str]:
    """Remove stale temporaries a killed writer left behind; return their names."""
    removed = []
    if directory.is_dir():
        for entry in os.scandir(directory):
            if is_temporary(entry.name):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


@dataclass
class _Item:
    step: int
    tensors: dict[str, torch.Tensor]
    event: object | None = None  # torch.cuda.Event to wait on before reading pinned buffers


@dataclass
class WriterStats:
    files_written: int = 0
    snapshots_written: int = 0
    bytes_written: int = 0
    backpressure_seconds: float = 0.0
    dropped: int = 0
    failed: int = 0  # snapshots lost to ENOSPC
    accepted: int = 0  # snapshots handed to the writer
    waits: int = 0  # times training found the queue full and waited
    events: list[dict] = field(default_factory=list)


class SnapshotWriter:
    """Write snapshots of ``layout`` into ``directory`` from a background thread."""

    def __init__(self, directory: str | os.PathLike, layout: SnapshotLayout, every: int, queue_depth: int = 4,
                 when_behind: str = "wait", fsync: bool = True, manifest_extra: dict | None = None) -> None:
        one_of("when_behind", when_behind, WHEN_BEHIND)
        self.directory = Path(directory)
        self.layout = layout
        self.every = every
        self.when_behind = when_behind
        self.fsync = fsync
        self.stats = WriterStats()
        self.last_step = 0
        self._intervals: list[dict] = []
        self._manifest_extra = dict(manifest_extra or {})
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._stack: torch.Tensor | dict | None = None
        self._stack_steps: list[int] = []
        self._stack_on_disk: tuple[int, int] | None = None  # (snapshots, bytes) of the open stack's partial file
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="budget-callback-writer", daemon=True)
        self._closed = False

    # --- training-thread side ---------------------------------------------------------------
    def start(self, resume_intervals: list[dict] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._intervals = list(resume_intervals or [])
        if not self._intervals or self._intervals[-1]["every"] != self.every:
            self._intervals.append({"from_step": self.last_step + 1, "every": self.every})
        self._write_manifest()
        self._thread.start()

    def submit(self, step: int, tensors: dict[str, torch.Tensor], event: object | None = None) -> bool:
        """Queue one snapshot. Blocks while the queue is full (``wait``) or drops it (``drop``)."""
        self.check()
        item = _Item(step, tensors, event)
        try:
            self._queue.put_nowait(item)
            self.stats.accepted += 1
            return True
        except queue.Full:
            pass
        if self.when_behind == "drop":
            self.stats.dropped += 1
            self.stats.events.append({"step": step, "event": "dropped", "reason": "writer queue full"})
            return False
        self.stats.waits += 1
        start = time.perf_counter()
        while True:  # wait, but surface a writer failure instead of blocking on a dead thread
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                self.check()
        self.stats.backpressure_seconds += time.perf_counter() - start
        self.stats.accepted += 1
        return True

    def set_interval(self, every: int, from_step: int) -> None:
        """Change the interval from ``from_step`` on: the partial stacked file is closed first."""
        self.flush()
        with self._lock:
            self.every = every
            self._intervals.append({"from_step": from_step, "every": every})
            self._write_manifest()

    def flush(self, final: bool = True) -> None:
        """Wait until everything queued is on disk, including a partial stacked file.

        ``final=False`` (before a checkpoint) writes the partial stack durably but
        keeps it open: later snapshots of the same stack rewrite that file in
        place, so checkpoints do not split stacked files (sizes stay as forecast).
        """
        self.check()
        if self._thread.is_alive():
            self._queue.put(_Item(_FLUSH if final else _FLUSH_KEEP, {}))
            self._queue.join()
        self.check()

    def close(self) -> None:
        """Flush and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._queue.put(_Item(_FLUSH, {}))
                self._queue.put(None)
                self._thread.join()
        finally:
            self.check()

    def check(self) -> None:
        """Raise the writer thread's error, with its cause, in the calling thread."""
        if self._error is not None:
            err, self._error = self._error, None
            raise SnapshotWriteError(f"the snapshot writer failed: {err!r}") from err

    @property
    def bytes_written(self) -> int:
        return self.stats.bytes_written

    @property
    def pending_bytes(self) -> int:
        """Raw bytes of snapshots accepted but not yet on disk (queued, in flight, or stacked)."""
        done = self.stats.snapshots_written + self.stats.failed
        return max(0, self.stats.accepted - done) * self.layout.step_bytes

    # --- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._handle(item)
            except BaseException as err:  # noqa: BLE001 - surfaced by check() on the training thread
                self._error = err
            finally:
                self._queue.task_done()

    def _handle(self, item: _Item) -> None:
        K = self.layout.snapshots_per_file
        if item.step < 0:  # flush marker
            if self._stack_steps:
                self._write_stack(final=item.step == _FLUSH)
            return
        if item.event is not None:
            item.event.synchronize()
        if K == 1:
            self._write({n: t for n, t in item.tensors.items()}, [item.step])
            return
        if self._stack_steps and item.step - self._stack_steps[-1] != self.every:
            self._write_stack()  # interval changed or a snapshot was dropped: keep files regular
        if self._stack is None:
            self._stack = {n: torch.empty((K, *t.shape), dtype=t.dtype) for n, t in item.tensors.items()}
        slot = len(self._stack_steps)
        for n, t in item.tensors.items():
            self._stack[n][slot].copy_(t)
        self._stack_steps.append(item.step)
        if len(self._stack_steps) == K:
            self._write_stack()

    def _write_stack(self, final: bool = True) -> None:
        count = len(self._stack_steps)
        on_disk = self._stack_on_disk
        if on_disk is None or on_disk[0] != count:
            size = self._write({n: t[:count] for n, t in self._stack.items()}, list(self._stack_steps), on_disk)
            if size is not None:
                self._stack_on_disk = (count, size)
        if final:
            self._stack_steps = []
            self._stack_on_disk = None

    def _write(self, tensors: dict[str, torch.Tensor], steps: list[int],
               replaces: tuple[int, int] | None = None) -> int | None:
        """Write one file atomically; ``replaces`` = (snapshots, bytes) of the partial file it supersedes.

        Returns the file's size, or None when the disk was full (the snapshot is counted as lost).
        """
        every = steps[1] - steps[0] if len(steps) > 1 else self.every
        path = self.directory / snapshot_name(steps[0])
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp),
                      metadata=self.layout.metadata(steps[0], len(steps), every))
            if self.fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(self.directory)
        except Exception as err:  # noqa: BLE001 - re-raised unless the disk is full
            tmp.unlink(missing_ok=True)
            if not is_disk_full(err):
                raise
            with self._lock:
                self.stats.failed += len(steps) - (replaces[0] if replaces else 0)
                self.stats.events.append({"step": steps[0], "event": "disk_full", "reason": "no space left on device"})
            return None
        size = path.stat().st_size
        old_count, old_size = replaces or (0, 0)
        with self._lock:
            self.stats.files_written += 0 if replaces else 1
            self.stats.snapshots_written += len(steps) - old_count
            self.stats.bytes_written += size - old_size
            self.last_step = steps[-1]
            try:
                self._write_manifest()
            except OSError as err:
                if not is_disk_full(err):
                    raise
                self.stats.events.append({"step": steps[-1], "event": "disk_full", "reason": "manifest not updated"})
        return size

    def _write_manifest(self) -> None:
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "vocab_size": self.layout.vocab_size,
            "hidden_dim": self.layout.hidden_dim,
            "dtype": self.layout.dtype,
            "snapshots_per_file": self.layout.snapshots_per_file,
            "names": list(self.layout.names),
            "tied": self.layout.tied,
            "include_embedding": self.layout.include_embedding,
            "intervals": self._intervals,
            "last_step": self.last_step,
            "files_written": self.stats.files_written,
            "bytes_written": self.stats.bytes_written,
            **self._manifest_extra,
        }
        data = json.dumps(manifest, indent=1).encode()
        if self.fsync:
            atomic_write_bytes(self.directory / MANIFEST, data)
        else:
            tmp = self.directory / f".{MANIFEST}{TMP_MARK}{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / MANIFEST)
