"""Rank 0's writer failure, told to every rank so that all of them stop together, with the cause.

The snapshot writer runs only on rank 0, in a thread: it can fail while every rank trains on. A rank that
raised alone would leave the others waiting in the next collective until the process group's timeout (30
minutes by default) with only "connection closed by peer" to go on. Nothing is exchanged per step for this:

* rank 0 posts the cause in the process group's key-value store;
* a thread on every other rank waits for it there (blocked; it wakes once a second to see whether the fit has
  ended, and is joined when it has), keeps the cause and acknowledges it;
* rank 0, at its next batch end, waits for every acknowledgement (threads: milliseconds), then posts the step
  at which all stop: its next batch end. No rank can pass that step's collective before rank 0 has posted it,
  and by then every rank holds the cause, so every rank raises there: none is left in a collective.

The store is the default process group's TCP store, reached through ``torch.distributed``'s
``_get_default_store`` (private: :func:`default_store`, the only private name here) with a client of our own.
Without it, rank 0's writer error is raised at once as in a single process (``available`` is False).
"""

from __future__ import annotations

import multiprocessing.util
import threading
import uuid
from datetime import timedelta

from ..errors import SnapshotWriteError

ACK_TIMEOUT = timedelta(seconds=120)  # bounds a rank that died: rank 0 raises anyway after this
STORE_TIMEOUT = timedelta(seconds=60)  # the client's own operations (connect, get, set)
WAKE = timedelta(seconds=1)  # a waiting thread wakes this often to see whether its fit has ended
_DONE, _ERROR = "done", "error:"


def default_store():
    """A client of its own to the default process group's TCP store (so that a blocking wait here never holds up
    the process group's own use of its client), or None: not initialised, another kind of store, another torch."""
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        if not dist.is_available() or not dist.is_initialized():
            return None
        store = distributed_c10d._get_default_store()
        while hasattr(store, "underlying_store"):  # PrefixStore
            store = store.underlying_store
        if not isinstance(store, dist.TCPStore):
            return None
        return dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)
    except Exception:  # noqa: BLE001 - unavailable: said by FailureNotice.available
        return None


def new_token() -> str:
    return uuid.uuid4().hex


class FailureNotice:
    """See the module doc. ``token`` is the same on every rank (rank 0 chooses it)."""

    def __init__(self, rank: int, world_size: int, token: str, store=None) -> None:
        self.rank, self.world_size = rank, world_size
        self.store = store if store is not None else (default_store() if world_size > 1 else None)
        self.key = f"budget-callback/{token}/"
        self.cause: str | None = None  # rank 0's error, once known on this rank
        self.stop_at: int | None = None
        self._seen = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self.store is not None and rank != 0:
            self._thread = threading.Thread(target=self._watch, name="budget-callback-notice", daemon=True)
            self._thread.start()
            # a process that exits without ending its fit (a spawned worker whose fit raised) ends the thread first
            multiprocessing.util.Finalize(self, _stop, args=(self._closed, self._thread), exitpriority=100)

    @property
    def available(self) -> bool:
        return self.store is not None

    def stop_if_failed(self, step: int, error: BaseException | None) -> None:
        """At every batch end on every rank (``error``: rank 0's writer error, None elsewhere): raise where every
        rank stops."""
        if not self.available:
            return
        if self.rank != 0:
            cause = self.stop_here(step)
            if cause is not None:
                raise SnapshotWriteError(f"budget-callback: rank 0's snapshot writer failed ({cause}); every rank "
                                         f"stops at step {self.stop_at}")
        elif error is not None:
            self.post(repr(error))
            if step >= self.stop_step(step):
                raise SnapshotWriteError(f"the snapshot writer failed: {error!r}; every rank stops at step "
                                         f"{self.stop_at}") from error

    # --- other ranks -----------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closed.is_set():
            try:
                self.store.wait([self.key + "event"], WAKE)
                event = self.store.get(self.key + "event").decode()
            except Exception:  # noqa: BLE001 - woke without it: wait again, unless the store is gone with rank 0
                try:
                    self.store.num_keys()
                except Exception:  # noqa: BLE001
                    return
                continue
            if event.startswith(_ERROR):
                self.cause = event[len(_ERROR):]
                self.store.set(f"{self.key}ack/{self.rank}", "1")  # done with the client: the training thread's now
                self._seen.set()
            return

    def stop_here(self, step: int) -> str | None:
        """Another rank, at a batch end: the cause when every rank stops at this step, else None."""
        if not self._seen.is_set():
            return None
        if self.stop_at is None:
            self.store.wait([self.key + "stop_at"])
            self.stop_at = int(self.store.get(self.key + "stop_at"))
        return self.cause if step >= self.stop_at else None

    # --- rank 0 ------------------------------------------------------------------------------------------
    def post(self, cause: str) -> None:
        if self.cause is None:
            self.cause = cause
            self.store.set(self.key + "event", _ERROR + cause)

    def stop_step(self, step: int) -> int:
        """Rank 0, at a batch end after :meth:`post`: the step at which every rank stops (the next batch end)."""
        if self.stop_at is None:
            acks = [f"{self.key}ack/{r}" for r in range(1, self.world_size)]
            try:
                self.store.wait(acks, ACK_TIMEOUT)
            except Exception:  # noqa: BLE001 - a rank that does not answer: stop without it
                pass
            self.stop_at = step + 1
            self.store.set(self.key + "stop_at", str(self.stop_at))
        return self.stop_at

    def end(self) -> None:
        """Rank 0, at the normal end of the fit (before the last shared decision): the others' threads end."""
        if self.rank == 0 and self.store is not None and self.cause is None:
            try:
                self.store.set(self.key + "event", _DONE)
            except Exception:  # noqa: BLE001 - the process group is already gone
                pass

    def close(self) -> None:
        """Teardown on every rank: the waiting thread has ended (within a second) before the client goes."""
        self.end()
        if self._thread is not None:
            _stop(self._closed, self._thread)
        self.store = None


def _stop(closed: threading.Event, thread: threading.Thread) -> None:
    closed.set()
    thread.join()
