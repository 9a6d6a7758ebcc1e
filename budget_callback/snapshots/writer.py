"""Background snapshot writer: bounded queue, atomic files, the series' manifest.

The capture hands over host copies of W (and E), in reused buffers, with their
:class:`~.schedule.Placement`; one thread writes them as safetensors files and
gives each buffer back once it has been read.
Every file and the manifest appear atomically (temporary name in the same
directory, fsync, rename, fsync of the directory), so a reader never sees a
partial file. A disk-full error (ENOSPC, EDQUOT) loses only the snapshot being
written, counted in the series; any other error stops the writer and is raised
in the training process at the next step.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SnapshotWriteError
from .directory import SnapshotFile, fsync_dir, is_disk_full
from .format import snapshot_name, temporary_name
from .schedule import Placement
from .series import Series

WHEN_BEHIND = ("wait", "drop")  # when every host buffer waits for the writer: training waits, or drops one
_FLUSH, _FLUSH_KEEP = "flush", "flush-keep"  # queue markers: close the open stack / write it but keep it open


@dataclass
class _Item:
    placement: Placement | str  # a snapshot, or a flush marker
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    event: object | None = None  # torch.cuda.Event to wait on before reading pinned buffers
    release: Callable[[], None] | None = None  # gives the host buffers back once they are read


@dataclass
class _Stack:
    """The open stacked file: K slots, the steps in it, what of it is on disk."""

    file_step: int
    every: int
    buffers: dict[str, torch.Tensor]
    steps: list[int] = field(default_factory=list)
    on_disk: tuple[int, int] | None = None  # (snapshots, bytes) of its partial file on disk


class SnapshotWriter:
    """Write the snapshots of ``series`` from a background thread."""

    def __init__(self, series: Series) -> None:
        self.series = series
        self.layout = series.layout
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # bounded by the capture's ring of buffers
        self._error: BaseException | None = None
        self._stack: _Stack | None = None
        self._thread = threading.Thread(target=self._run, name="budget-callback-writer", daemon=True)
        self.closed = False

    # --- training-thread side ---------------------------------------------------------------
    def start(self, open_file: SnapshotFile | None = None) -> None:
        """Start the thread; ``open_file``: a partial stacked file on disk that later snapshots extend."""
        if open_file is not None:
            self._stack = self._load_stack(open_file)
        self._thread.start()

    def submit(self, placement: Placement, tensors: dict[str, torch.Tensor], event: object | None = None,
               release: Callable[[], None] | None = None) -> None:
        """Queue one snapshot; ``release()`` is called once its tensors have been read. Never blocks:
        the capture's ring of host buffers bounds what can wait here."""
        self.check()
        self._queue.put(_Item(placement, tensors, event, release))

    def flush(self, final: bool = True) -> None:
        """Wait until everything queued is on disk, including a partial stacked file.

        ``final=False`` (before a checkpoint) writes the partial stack durably but
        keeps it open: later snapshots of the same file rewrite it in place, so
        checkpoints do not split stacked files (sizes stay as forecast).
        """
        self.check()
        if self._thread.is_alive():
            self._queue.put(_Item(_FLUSH if final else _FLUSH_KEEP))
            self._queue.join()
        self.check()

    def close(self) -> None:
        """Flush and stop the thread (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._thread.is_alive():
                self._queue.put(_Item(_FLUSH))
                self._queue.put(None)
                self._thread.join()
        finally:
            self.check()

    def check(self) -> None:
        """Raise the writer thread's error, with its cause, in the calling thread."""
        if self._error is not None:
            err, self._error = self._error, None
            raise SnapshotWriteError(f"the snapshot writer failed: {err!r}") from err

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
        if isinstance(item.placement, str):  # flush marker
            if self._stack is not None and self._stack.steps:
                self._write_stack(final=item.placement == _FLUSH)
            return
        try:
            self._place(item)
        finally:
            if item.release is not None:
                item.release()

    def _place(self, item: _Item) -> None:
        p = item.placement
        if item.event is not None:
            item.event.synchronize()
        if not self.layout.stacked:
            self._write(item.tensors, [p.step], p.every)
            return
        if self._stack is not None and self._stack.file_step != p.file_step:
            self._write_stack()  # the previous file ended early (a dropped snapshot, an interval change)
        if self._stack is None:
            K = self.layout.snapshots_per_file
            self._stack = _Stack(p.file_step, p.every,
                                 {n: torch.empty((K, *t.shape), dtype=t.dtype) for n, t in item.tensors.items()})
        stack = self._stack
        for n, t in item.tensors.items():
            stack.buffers[n][len(stack.steps)].copy_(t)
        stack.steps.append(p.step)
        if p.slot == self.layout.snapshots_per_file - 1:
            self._write_stack()

    def _write_stack(self, final: bool = True) -> None:
        stack = self._stack
        count = len(stack.steps)
        if count and (stack.on_disk is None or stack.on_disk[0] != count):
            size = self._write({n: b[:count] for n, b in stack.buffers.items()}, list(stack.steps), stack.every,
                               stack.on_disk)
            if size is not None:
                stack.on_disk = (count, size)
        if final:
            self._stack = None

    def _load_stack(self, f: SnapshotFile) -> _Stack:
        K = self.layout.snapshots_per_file
        with safe_open(str(f.path), framework="pt") as fh:
            parts = {n: fh.get_tensor(n) for n in fh.keys()}
        buffers = {n: torch.empty((K, *t.shape[1:]), dtype=t.dtype) for n, t in parts.items()}
        for n, t in parts.items():
            buffers[n][: f.count].copy_(t)
        return _Stack(f.first_step, f.every, buffers, list(f.steps), (f.count, f.size))

    def _write(self, tensors: dict[str, torch.Tensor], steps: list[int], every: int,
               replaces: tuple[int, int] | None = None) -> int | None:
        """Write one file atomically; ``replaces`` = (snapshots, bytes) of the partial file it supersedes.

        Returns the file's size, or None when the disk was full (its new snapshots are counted as lost).
        """
        directory = self.series.directory
        path = directory / snapshot_name(steps[0])
        tmp = directory / temporary_name(path.name, os.getpid())
        try:
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp),
                      metadata=self.layout.metadata(steps[0], len(steps), every, steps))
            if self.series.fsync:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.series.fsync:
                fsync_dir(directory)
        except Exception as err:  # noqa: BLE001 - re-raised unless the disk is full
            tmp.unlink(missing_ok=True)
            if not is_disk_full(err):
                raise
            self.series.record_lost(steps[replaces[0] if replaces else 0:], "no space left on device")
            return None
        size = path.stat().st_size
        self.series.record_file(steps[0], len(steps), size)
        self.series.write_manifest()
        return size
