"""Copy W (and E) into a ring of reused host buffers, off the training thread, for the writer.

One mechanism for every device, with a device-specific copy:

* a ring of at most ``queue_depth + 2`` host buffers (pinned on CUDA), each laid out as one whole file
  (:class:`~budget_callback.snapshots.image.FileImage`), made when first needed and reused: one being
  filled, at most ``queue_depth`` waiting for the writer, one being written. A buffer goes back to
  the ring when the writer is done with it; when none is free the step waits (``when_behind="wait"``,
  timed as back-pressure) or the snapshot is dropped and counted (``"drop"``);
* the copy into the buffer (``copy_``: a cast into an existing buffer, no allocation) runs where it
  costs training nothing: on CUDA it is ``non_blocking`` on the current stream with an event (the
  optimizer's next kernels are ordered after it); on the CPU a copier thread does it while the next
  forward and backward run, and :meth:`Capture.wait` (the callback's ``on_before_optimizer_step``)
  makes sure it has read W before the optimizer changes it.
* ``overlap=False`` (guarded): other code runs between the steps that could change W in place (the
  module's own hooks, a weight-averaging callback): each snapshot's copy is finished before
  :meth:`take` returns, still off the training thread's allocator. In both modes the copy checks W's
  version counter: a W changed while it was read is never written (the snapshot is dropped,
  counted, and the capture turns guarded).

The training thread only places the request: its time per snapshot is bookkeeping, not bytes.
A sharded W is gathered first by every rank (a collective), on the training thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SnapshotWriteError
from ..snapshots.format import SnapshotLayout, ring_size
from ..snapshots.image import FileImage
from .locate import MatrixSource

Ready = Callable[[FileImage, object, Callable[[], None]], None]


@dataclass
class CaptureStats:
    backpressure_seconds: float = 0.0  # training waited for a free buffer (the disk is slower than training)
    waits: int = 0  # times it waited
    dropped: int = 0  # snapshots dropped for want of a buffer (when_behind="drop")
    copy_waits: int = 0  # times the optimizer step waited for a copy to finish reading W
    copy_wait_seconds: float = 0.0
    taken: int = 0
    torn: int = 0  # snapshots dropped because W changed while it was being copied


class Capture:
    """Takes snapshots of the matrices of ``sources`` in ``dtype``. Every rank calls :meth:`take` (a sharded W
    is gathered collectively); only the writing rank copies, and hands each filled buffer to ``ready``."""

    def __init__(self, sources: dict[str, MatrixSource], layout: SnapshotLayout, queue_depth: int, writes: bool,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None, when_behind: str = "wait",
                 overlap: bool = True, on_torn: Callable[[int], None] | None = None) -> None:
        self.sources = sources
        self.layout = layout
        self.writes = writes
        self.when_behind = when_behind
        self.overlap = overlap
        self.on_torn = on_torn
        self.stats = CaptureStats()
        self._gather = gather
        self._size = ring_size(queue_depth)
        self._ring: list[FileImage] = []
        self._free: queue.Queue[int] = queue.Queue()
        self._requests: queue.Queue = queue.Queue()
        self._copier: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- the ring ----------------------------------------------------------------------------
    def _acquire(self, pin: bool) -> int | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if len(self._ring) < self._size:  # grown on demand: a writer that keeps up needs two or three
            self._ring.append(FileImage(self.layout, pin_memory=pin))
            return len(self._ring) - 1
        if self.when_behind == "drop":
            self.stats.dropped += 1
            return None
        self.stats.waits += 1
        start = time.perf_counter()
        while True:  # wait for the writer, but surface a copier failure instead of blocking forever
            try:
                slot = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                self._check()
        self.stats.backpressure_seconds += time.perf_counter() - start
        return slot

    def _release(self, slot: int) -> Callable[[], None]:
        return lambda: self._free.put(slot)

    @property
    def host_bytes(self) -> int:
        return sum(image.nbytes for image in self._ring)

    # --- taking a snapshot ---------------------------------------------------------------------------
    def take(self, ready: Ready, step: int, every: int) -> bool:
        """Capture the matrices now, as the file of ``step``; ``ready(image, event, release)`` is called once
        the copy is placed (CUDA: at once, with an event) or done (CPU: from the copier). False when dropped
        (or not writing)."""
        self._check()
        with self._gather() if self._gather is not None else contextlib.nullcontext():
            matrices = {name: source.matrix() for name, source in self.sources.items()}  # collective if sharded
            if not self.writes:
                return False
            slot = self._acquire(any(w.device.type == "cuda" for w in matrices.values()))
            if slot is None:
                return False
            self.stats.taken += 1
            image = self._ring[slot]
            views = image.prepare(step, every)
            if any(w.device.type == "cuda" for w in matrices.values()):
                for name, w in matrices.items():
                    views[name].copy_(w, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                ready(image, event, self._release(slot))
                return True
        self._start_copier()
        versions = {name: w._version for name, w in matrices.items()}
        self._requests.put((image, matrices, versions, step, ready, self._release(slot)))
        if not self.overlap:
            self.wait()
        return True

    def _start_copier(self) -> None:
        if self._copier is None:
            self._copier = threading.Thread(target=self._copy_loop, name="budget-callback-capture", daemon=True)
            self._copier.start()

    def _copy_loop(self) -> None:
        while True:
            request = self._requests.get()
            try:
                if request is None:
                    return
                if self._error is None:
                    image, matrices, versions, step, ready, release = request
                    with torch.no_grad():
                        for name, w in matrices.items():
                            image.tensors[name].copy_(w)
                    changed = any(w._version != versions[name] for name, w in matrices.items())
                    del matrices  # W is read: the optimizer may change it now
                    if changed:  # something wrote W while it was read: never write a torn snapshot
                        release()
                        self.stats.torn += 1
                        self.overlap = False
                        if self.on_torn is not None:
                            self.on_torn(step)
                    else:
                        ready(image, None, release)
            except BaseException as err:  # noqa: BLE001 - surfaced on the training thread
                self._error = err
            finally:
                self._requests.task_done()

    def wait(self) -> None:
        """Block until every copy placed so far has read W (before the optimizer changes it)."""
        if self._copier is None or self._requests.unfinished_tasks == 0:
            self._check()
            return
        self.stats.copy_waits += 1
        start = time.perf_counter()
        self._requests.join()
        self.stats.copy_wait_seconds += time.perf_counter() - start
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, SnapshotWriteError):  # the writer's own failure, handed on by the copier
                raise err
            raise SnapshotWriteError(f"copying a snapshot failed: {err!r}") from err

    def close(self) -> None:
        """Finish the copies placed so far and stop the copier (idempotent)."""
        if self._copier is not None and self._copier.is_alive():
            self._requests.join()
            self._requests.put(None)
            self._copier.join()
        self._copier = None
        self._check()
