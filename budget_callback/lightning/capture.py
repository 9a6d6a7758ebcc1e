"""Copy W (and E) into a ring of reused host buffers, off the training thread, for the writer.

One mechanism for every device, with a device-specific copy:

* a ring of host buffers (pinned on CUDA), each laid out as one whole file
  (:class:`~budget_callback.snapshots.image.FileImage`), made when first needed and reused: one being
  filled, some waiting for the writer, one being written. A buffer goes back to the ring when the writer
  is done with it; when none is free and the ring may not grow, the step waits (``when_behind="wait"``,
  timed as back-pressure) or the snapshot is dropped and counted (``"drop"``). The ring grows only as the
  measured pace asks (:func:`~budget_callback.snapshots.format.ring_buffers`: the writer's time per file
  against the training's own time between snapshots; a disk slower than the steps gets the fewest buffers,
  which cost it nothing more than more would), up to ``max_buffers``: the forecast's cap, ``queue_depth + 2``
  within a share of the host RAM available (:func:`~budget_callback.snapshots.format.ring_cap`);
* the copy into the buffer (``copy_``: a cast into an existing buffer, no allocation) runs where it
  costs training nothing: on CUDA it is ``non_blocking`` on the current stream with an event (the
  optimizer's next kernels are ordered after it); on the CPU a copier thread does it while the next
  forward and backward run, and :meth:`Capture.wait` (the callback's ``on_before_optimizer_step``)
  makes sure it has read W before the optimizer changes it.
* ``overlap=False`` (guarded): other code runs between the steps that could change W in place (the
  module's own hooks, a weight-averaging callback): each snapshot's copy is finished before
  :meth:`take` returns, still off the training thread's allocator. In both modes W's version counter
  is checked on the training thread once the copy is done and before its image goes to the writer
  (overlapped: at :meth:`wait`, after the next forward and backward): a W changed in place while it
  could have been read is never written (the snapshot is dropped, counted, and the capture turns
  guarded). Writes through ``.data`` bypass the version counter: the fit-start trace finds those in a
  training step it can trace (the capture then starts guarded, :mod:`.planning`), and the same check
  compares a few rows of the copy, drawn at random, with the same rows read when the copy was placed
  and read again now: a write to every row of W is seen whenever it happened (before, during or
  after the copy), a write to a fraction f of the rows with probability about ``1 - (1 - f) ** 8``.

The training thread only places the request: its time per snapshot is bookkeeping, not bytes.
A sharded W is gathered first by every rank (a collective), on the training thread.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SnapshotWriteError
from ..snapshots.format import RING_SAMPLES, SnapshotLayout, ring_buffers
from ..snapshots.image import FileImage
from .locate import MatrixSource

Ready = Callable[[FileImage, object, Callable[[], None]], None]
_SAMPLED_ROWS = 8  # rows of each overlapped copy compared with W before it is written
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # compare as bits: NaN == NaN, -0.0 != 0.0


@dataclass
class CaptureStats:
    backpressure_seconds: float = 0.0  # training waited for a free buffer (the disk is slower than training)
    waits: int = 0  # times it waited
    dropped: int = 0  # snapshots dropped for want of a buffer (when_behind="drop")
    copy_waits: int = 0  # times the optimizer step waited for a copy to finish reading W
    copy_wait_seconds: float = 0.0
    taken: int = 0
    torn: int = 0  # snapshots dropped because W changed while it was being copied
    path: str = ""  # how the last snapshot was copied: "cuda pinned ring" | "cpu copier" | "cpu guarded"
    ring_buffers: int = 0  # file images the ring holds (it never gives one back)
    ring_allowed: int = 0  # what the measured pace allowed when it last had to decide, at most the cap
    ring_sized_by: str = ""  # why (format.ring_buffers)


@dataclass
class _Copied:
    """A copy placed on the copier: checked on the training thread before its image goes to the writer."""

    image: FileImage
    watch: dict[str, torch.Tensor]  # the model's own matrices (empty for a gathered W)
    versions: dict[str, int]  # their version counters when the copy was placed
    sample: dict[str, tuple]  # a few rows of each, read when the copy was placed (overlapped copies only)
    step: int
    ready: Ready
    slot: int


class Capture:
    """Takes snapshots of the matrices of ``sources`` in ``dtype``. Every rank calls :meth:`take` (a sharded W
    is gathered collectively); only the writing rank copies, and hands each filled buffer to ``ready``. The ring
    holds at most ``max_buffers`` file images, as many as the measured pace asks; ``clock`` times that pace."""

    def __init__(self, sources: dict[str, MatrixSource], layout: SnapshotLayout, max_buffers: int, writes: bool,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None, when_behind: str = "wait",
                 overlap: bool = True, on_torn: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.sources = sources
        self.layout = layout
        self.writes = writes
        self.when_behind = when_behind
        self.overlap = overlap
        self.on_torn = on_torn
        self.stats = CaptureStats()
        self._gather = gather
        self._rng = random.Random(0x5EED)  # its own generator: the run's random state is never touched
        self._cap = max_buffers
        self._clock = clock
        self._ring: list[FileImage] = []
        self._free: queue.Queue[int] = queue.Queue()
        # the pace the ring is sized from: the writer's time per image (from the writer's thread) and the training's
        # own time between snapshots, its waits for a buffer or a copy left out
        self._pace_lock = threading.Lock()
        self._writes: deque[float] = deque(maxlen=RING_SAMPLES)
        self._intervals: deque[float] = deque(maxlen=RING_SAMPLES)
        self._handed: dict[int, float] = {}  # slot -> when it went to the writer
        self._last_release = float("-inf")
        self._last_take: tuple[float, float] | None = None  # (when, waited so far) at the last take
        self._waited = 0.0  # seconds the training thread waited for a buffer or a copy, in all
        self._requests: queue.Queue = queue.Queue()
        self._copied: queue.Queue[_Copied] = queue.Queue()  # done by the copier, not yet checked and handed on
        self._copier: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- the ring ----------------------------------------------------------------------------
    def _acquire(self, pin: bool) -> int | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if len(self._ring) < self._allowed():  # grown on demand, as far as the pace asks
            self._ring.append(FileImage(self.layout, pin_memory=pin))
            self.stats.ring_buffers = len(self._ring)
            return len(self._ring) - 1
        if self.when_behind == "drop":
            self.stats.dropped += 1
            return None
        self.stats.waits += 1
        start = self._clock()
        while True:  # wait for the writer, but surface a copier failure instead of blocking forever
            try:
                slot = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                self._check()
        waited = self._clock() - start
        self.stats.backpressure_seconds += waited
        self._waited += waited
        return slot

    def _allowed(self) -> int:
        """How many file images the ring may hold now: what the measured pace asks, at most the cap."""
        with self._pace_lock:
            writes, intervals = list(self._writes), list(self._intervals)
        self.stats.ring_allowed, self.stats.ring_sized_by = ring_buffers(writes, intervals, self._cap)
        return self.stats.ring_allowed

    def _hand_over(self, slot: int) -> Callable[[], None]:
        """The buffer goes to the writer now; the callable the writer calls once it has read it (gives it back,
        and times the writer: from when it could start on this image, this one or the last given back, to now)."""
        self._handed[slot] = self._clock()

        def written() -> None:
            now = self._clock()
            with self._pace_lock:
                self._writes.append(now - max(self._handed[slot], self._last_release))
                self._last_release = now
            self._free.put(slot)
        return written

    def _give_back(self, slot: int) -> None:
        """The buffer goes back unwritten (a torn copy, a failed copier): nothing timed."""
        self._free.put(slot)

    def _note_take(self) -> None:
        """The training's own time since the last snapshot (its waits left out), for the ring's pace."""
        now = self._clock()
        if self._last_take is not None:
            when, waited = self._last_take
            with self._pace_lock:
                self._intervals.append(max(0.0, now - when - (self._waited - waited)))
        self._last_take = (now, self._waited)

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
            self._note_take()
            slot = self._acquire(any(w.device.type == "cuda" for w in matrices.values()))
            if slot is None:
                return False
            self.stats.taken += 1
            image = self._ring[slot]
            views = image.prepare(step, every)
            if any(w.device.type == "cuda" for w in matrices.values()):
                for name, w in matrices.items():
                    views[name].copy_(w, non_blocking=True)
                    if self._gather is not None:  # the gathered W is freed when the gather ends, perhaps into
                        w.record_stream(torch.cuda.current_stream())  # another stream's pool: keep it to the copy
                self.stats.path = "cuda pinned ring"
                event = torch.cuda.Event()
                event.record()
                ready(image, event, self._hand_over(slot))
                return True
        self._settle()
        self._start_copier()
        versions = {name: w._version for name, w in matrices.items()}
        # a gathered W is a private copy: nothing else writes it; the model's own W is watched until checked
        watch = {} if self._gather is not None else matrices
        sample = self._sample(watch, image) if self.overlap else {}  # guarded: checked before anything runs
        self.stats.path = "cpu copier" if self.overlap else "cpu guarded"
        self._requests.put((image, matrices, _Copied(image, watch, versions, sample, step, ready, slot)))
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
                    image, matrices, copied = request
                    with torch.no_grad():
                        for name, w in matrices.items():
                            image.tensors[name].copy_(w)
                    del matrices  # W is read: the optimizer may change it now
                    self._copied.put(copied)  # checked and handed on by the training thread (_settle)
                else:
                    self._give_back(request[2].slot)
            except BaseException as err:  # noqa: BLE001 - surfaced on the training thread
                self._error = err
            finally:
                self._requests.task_done()

    def wait(self) -> None:
        """Block until every copy placed so far has read W (before the optimizer changes it), then hand
        the finished copies on (:meth:`_settle`)."""
        if self._copier is not None and self._requests.unfinished_tasks:
            self.stats.copy_waits += 1
            start = self._clock()
            self._requests.join()
            waited = self._clock() - start
            self.stats.copy_wait_seconds += waited
            self._waited += waited
        self._settle()
        self._check()

    def _sample(self, matrices: dict[str, torch.Tensor], image: FileImage) -> dict[str, tuple]:
        """A few rows of each matrix, drawn at random, as they will be stored: ``{name: (rows, values)}``."""
        out = {}
        for name, w in matrices.items():
            rows = torch.tensor(self._rng.sample(range(w.shape[0]), min(_SAMPLED_ROWS, w.shape[0])))
            out[name] = (rows, w.detach().index_select(0, rows).to(image.tensors[name].dtype))
        return out

    @staticmethod
    def _differs(c: _Copied) -> bool:
        """Whether the sampled rows of the copy differ (bit for bit) from W when the copy was placed or now."""
        for name, (rows, then) in c.sample.items():
            bits = _BITS[then.element_size()]
            copied = c.image.tensors[name].index_select(0, rows).view(bits)
            now = c.watch[name].detach().index_select(0, rows).to(then.dtype).view(bits)
            if not (torch.equal(copied, then.view(bits)) and torch.equal(copied, now)):
                return True
        return False

    def _settle(self) -> None:
        """On the training thread: each finished copy goes to the writer if W's version counter has not moved
        since the copy was placed; otherwise W was written in place while it could have been read (the
        counter moves after the write, so a check on the copier could pass a half-written W): dropped,
        counted, and from now on every copy is finished before the step goes on."""
        while True:
            try:
                c = self._copied.get_nowait()
            except queue.Empty:
                return
            if any(w._version != c.versions[name] for name, w in c.watch.items()) or self._differs(c):
                self._give_back(c.slot)
                self.stats.torn += 1
                self.overlap = False
                if self.on_torn is not None:
                    self.on_torn(c.step)
            else:
                c.ready(c.image, None, self._hand_over(c.slot))

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, SnapshotWriteError):  # the writer's own failure, handed on by the copier
                raise err
            raise SnapshotWriteError(f"copying a snapshot failed: {err!r}") from err

    def close(self) -> None:
        """Finish the copies placed so far, hand them on, and stop the copier (idempotent)."""
        if self._copier is not None and self._copier.is_alive():
            self._requests.join()
            self._requests.put(None)
            self._copier.join()
        self._copier = None
        self._settle()
        self._check()
