"""Background snapshot writer: atomic files at the disk's speed, the series' manifest.

The capture hands over each snapshot as a :class:`~.image.FileImage` (the file's header and data
laid out in a reused, page-aligned host buffer) with its :class:`~.schedule.Placement`; one thread
writes them and gives each buffer back once it has been read.

* Large files go to the disk with O_DIRECT straight from the image (no page cache, no second copy;
  a buffered write with the page cache released where O_DIRECT is refused), then fsync, rename and
  a directory fsync (:mod:`.diskio`).
* Small files (under ``SMALL_FILE_BYTES``) are committed in groups: up to ``GROUP_FILES`` written,
  then one fsync each and one directory fsync for all, or sooner when ``GROUP_SECONDS`` pass
  without a new one, at a checkpoint and at the end.
* ``manifest.json`` is rewritten at most every ``MANIFEST_SECONDS``, at checkpoints and at the end.

Crash guarantee (tested with SIGKILL): every visible snapshot file is complete and loads; a crash
loses at most the files not yet committed (at most ``GROUP_FILES``, their temporaries are cleaned
at the next start), and the manifest may lag behind the files (a resume reads the files).

A full disk (ENOSPC, EDQUOT) loses only the snapshots being written, counted in the series; any
other error stops the writer and is raised in the training process at the next step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from ..errors import SnapshotWriteError
from . import diskio
from .directory import SnapshotFile, is_disk_full
from .format import encode_header, snapshot_name
from .image import FileImage
from .schedule import Placement
from .series import Series

WHEN_BEHIND = ("wait", "drop")  # when every host buffer waits for the writer: training waits, or drops one
SMALL_FILE_BYTES = 8 << 20  # files under this size are committed in groups
GROUP_FILES = 16
GROUP_SECONDS = 5.0
MANIFEST_SECONDS = 10.0
_FLUSH, _FLUSH_KEEP = "flush", "flush-keep"  # queue markers: close the open stack / write it but keep it open


@dataclass
class _Item:
    placement: Placement | str  # a snapshot, or a flush marker
    image: FileImage | None = None
    event: object | None = None  # torch.cuda.Event to wait on before reading pinned buffers
    release: Callable[[], None] | None = None  # gives the host buffer back once it is read


@dataclass
class _Stack:
    """The open stacked file: K slots, the steps in it, what of it is on disk."""

    file_step: int
    every: int
    buffers: dict[str, torch.Tensor]
    steps: list[int] = field(default_factory=list)
    on_disk: tuple[int, int] | None = None  # (snapshots, bytes) of its partial file on disk


@dataclass
class WriterStats:
    files: int = 0
    direct_files: int = 0  # written with O_DIRECT
    grouped_files: int = 0  # committed in groups
    fallback: str | None = None  # why O_DIRECT was not used, when it was refused


class SnapshotWriter:
    """Write the snapshots of ``series`` from a background thread."""

    def __init__(self, series: Series) -> None:
        self.series = series
        self.layout = series.layout
        self.stats = WriterStats()
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # bounded by the capture's ring of buffers
        self._error: BaseException | None = None
        self._stack: _Stack | None = None
        self._stacks: dict[str, torch.Tensor] | None = None
        self._group = diskio.GroupCommit(series.directory, fsync=series.fsync)
        # (steps, bytes, partial) of the files in the open group; partial: an open stacked file written at a checkpoint
        self._grouped: list[tuple[list[int], int, bool]] = []
        self._uncommitted = 0  # bytes of files written as temporaries, not yet committed
        self._bytes_lock = threading.Lock()  # a read of on_disk_bytes never sees a file twice or not at all
        self._manifest_at = 0.0
        self._thread = threading.Thread(target=self._run, name="budget-callback-writer", daemon=True)
        self.closed = False
        self.hold_errors = False  # True: the error waits in `error` for the caller (several ranks stop together)

    # --- training-thread side ---------------------------------------------------------------
    def start(self, open_file: SnapshotFile | None = None) -> None:
        """Start the thread; ``open_file``: a partial stacked file on disk that later snapshots extend."""
        if open_file is not None:
            self._stack = self._load_stack(open_file)
        self._manifest_at = time.monotonic()
        self._thread.start()

    def submit(self, placement: Placement, image: FileImage, event: object | None = None,
               release: Callable[[], None] | None = None) -> None:
        """Queue one snapshot; ``release()`` is called once its image has been read. Never blocks:
        the capture's ring of host buffers bounds what can wait here."""
        self.check()
        self._queue.put(_Item(placement, image, event, release))

    def flush(self, final: bool = True) -> None:
        """Wait until everything queued is on disk, committed, and in the manifest.

        ``final=False`` (before a checkpoint) writes a partial stacked file durably but keeps it
        open: later snapshots of the same file rewrite it in place, so checkpoints do not split
        stacked files (sizes stay as forecast).
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

    @property
    def on_disk_bytes(self) -> int:
        """Snapshot bytes on disk now: committed files and those written but waiting for their group commit
        (their temporaries already take the space)."""
        with self._bytes_lock:
            return self.series.bytes_written + self._uncommitted

    @property
    def error(self) -> BaseException | None:
        """The writer thread's error, if it stopped on one."""
        return self._error

    def check(self) -> None:
        """Raise the writer thread's error, with its cause, in the calling thread (unless ``hold_errors``)."""
        if self._error is not None and not self.hold_errors:
            err, self._error = self._error, None
            raise SnapshotWriteError(f"the snapshot writer failed: {err!r}") from err

    # --- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:  # an idle writer commits what it holds
                item = self._queue.get(timeout=GROUP_SECONDS if len(self._group) else None)
            except queue.Empty:
                self._safely(self._commit)
                continue
            try:
                if item is None:
                    return
                if self._error is not None and item.release is not None:
                    item.release()  # stopped on an error: nothing more is written, the buffer goes back
                else:
                    self._safely(lambda: self._handle(item))
            finally:
                self._queue.task_done()

    def _safely(self, work: Callable[[], None]) -> None:
        try:
            if self._error is None:
                work()
        except BaseException as err:  # noqa: BLE001 - surfaced by check() on the training thread
            self._error = err
            try:  # the complete files waiting for their group commit are not lost with it
                self._commit()
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                pass

    def _handle(self, item: _Item) -> None:
        if isinstance(item.placement, str):  # flush marker
            if self._stack is not None and self._stack.steps:
                self._write_stack(final=item.placement == _FLUSH)
            self._commit()
            self._write_manifest(force=True)
            return
        try:
            self._place(item)
        finally:
            if item.release is not None:
                item.release()
        self._write_manifest()

    def _place(self, item: _Item) -> None:
        p, image = item.placement, item.image
        if item.event is not None:
            item.event.synchronize()
        if self.layout.dtype == "float16":  # off the training thread: values beyond float16's range became inf
            infinite = sum(int(torch.isinf(t).sum()) for t in image.tensors.values())
            if infinite:
                self.series.record_overflow(p.step, infinite)
        if not self.layout.stacked:  # the image is the file: written from where it lies
            self._write(image.header, list(image.tensors.values()), [p.step], p.every)
            return
        if self._stack is not None and self._stack.file_step != p.file_step:
            self._write_stack()  # the previous file ended early (a dropped snapshot, an interval change)
        if self._stack is None:
            self._stack = _Stack(p.file_step, p.every, self._stack_buffers(image.tensors))
        stack = self._stack
        for n, t in image.tensors.items():
            stack.buffers[n][len(stack.steps)].copy_(t)
        stack.steps.append(p.step)
        if p.slot == self.layout.snapshots_per_file - 1:
            self._write_stack()

    def _write_stack(self, final: bool = True) -> None:
        stack = self._stack
        count = len(stack.steps)
        if count and (stack.on_disk is None or stack.on_disk[0] != count):
            tensors = {n: b[:count] for n, b in sorted(stack.buffers.items())}
            meta = self.layout.metadata(stack.steps[0], count, stack.every, stack.steps)
            header = encode_header({n: (self._code(), tuple(t.shape)) for n, t in tensors.items()}, meta)
            size = self._write(header, list(tensors.values()), list(stack.steps), stack.every, stack.on_disk,
                               partial=not final)
            if size is not None:
                stack.on_disk = (count, size)
        if final:
            self._stack = None

    def _stack_buffers(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The (K, V, D) buffers of a stacked file: allocated once (page-aligned, touched), reused by every file
        (a fresh one per file cost more in page faults than the copies into it)."""
        if self._stacks is None:
            K = self.layout.snapshots_per_file
            self._stacks = {}
            for n, t in like.items():
                raw = diskio.aligned_empty(K * t.numel() * t.element_size())
                self._stacks[n] = raw[: K * t.numel() * t.element_size()].view(t.dtype).view(K, *t.shape)
        return self._stacks

    def _code(self) -> str:
        return self.layout.tensors(1)[self.layout.names[0]][0]

    def _load_stack(self, f: SnapshotFile) -> _Stack:
        with safe_open(str(f.path), framework="pt") as fh:
            parts = {n: fh.get_tensor(n) for n in fh.keys()}
        buffers = self._stack_buffers({n: t[0] for n, t in parts.items()})
        for n, t in parts.items():
            buffers[n][: f.count].copy_(t)
        return _Stack(f.first_step, f.every, buffers, list(f.steps), (f.count, f.size))

    def _write(self, header: bytes, tensors: list[torch.Tensor], steps: list[int], every: int,
               replaces: tuple[int, int] | None = None, partial: bool = False) -> int | None:
        """Write one file (``header`` then ``tensors``' bytes) atomically; ``replaces`` = (snapshots, bytes)
        of the partial file it supersedes. Returns its size, or None when the disk was full: its new
        snapshots are counted as lost, unless ``partial`` (an open stacked file written at a checkpoint: they
        are still in memory and written when the file fills)."""
        path = self.series.directory / snapshot_name(steps[0])
        size = len(header) + sum(t.numel() * t.element_size() for t in tensors)
        try:
            if size < SMALL_FILE_BYTES and replaces is None:
                self._group.add(path, header, tensors)
                self._grouped.append((steps, size, partial))
                with self._bytes_lock:
                    self._uncommitted += size
                if len(self._group) >= GROUP_FILES:
                    self._commit()
                return size
            self._commit()  # files become visible in order
            info = diskio.write_snapshot_file(path, header, tensors, fsync=self.series.fsync, direct=True)
        except Exception as err:  # noqa: BLE001 - re-raised unless the disk is full
            if not is_disk_full(err):
                raise
            if partial:
                self._deferred(steps)
            else:
                self.series.record_lost(steps[replaces[0] if replaces else 0:], "no space left on device")
            return None
        self.stats.files += 0 if replaces else 1
        self.stats.direct_files += 1 if info.direct_bytes else 0
        self.stats.fallback = info.fallback or self.stats.fallback
        self.series.record_file(steps[0], len(steps), size)
        return size

    def _commit(self) -> None:
        """Make the open group of small files durable and visible."""
        if not len(self._group):
            return
        grouped, self._grouped = self._grouped, []
        try:
            self._group.commit()
        except Exception as err:  # noqa: BLE001 - re-raised unless the disk is full
            with self._bytes_lock:
                self._uncommitted -= sum(size for _, size, _ in grouped)
            if not is_disk_full(err):
                raise
            for steps, _, partial in grouped:
                if not partial:
                    self.series.record_lost(steps, "no space left on device")
                    continue
                self._deferred(steps)
                if self._stack is not None and self._stack.file_step == steps[0]:
                    self._stack.on_disk = None  # its partial file never became visible
            return
        with self._bytes_lock:
            for steps, size, _ in grouped:
                self.series.record_file(steps[0], len(steps), size)
                self._uncommitted -= size
        self.stats.files += len(grouped)
        self.stats.grouped_files += len(grouped)

    def _deferred(self, steps: list[int]) -> None:
        """A checkpoint could not write the open stacked file (the disk is full): nothing is lost yet."""
        self.series.event({"step": steps[-1], "event": "disk_full", "snapshots": 0,
                           "reason": f"the open stacked file (steps {steps[0]}-{steps[-1]}) could not be written at a "
                                     "checkpoint; it stays in memory and is written when it fills"})

    def _write_manifest(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._manifest_at >= MANIFEST_SECONDS:
            self._manifest_at = now
            self.series.write_manifest()
