"""Copy W (and E) into reused host buffers for the writer, gathering a sharded W first.

One mechanism for every device: a ring of host buffers per matrix, allocated
once (pinned on CUDA), each snapshot copied into the next one with ``copy_``
(a cast into an existing buffer: no allocation, no page faults). On CUDA the
copy is ``non_blocking`` and an event marks its completion for the writer.
The ring holds ``queue_depth + 2`` buffers: one being filled, at most
``queue_depth`` queued, one being written, so a buffer is never refilled before
the writer is done with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .locate import MatrixSource


def ring_size(queue_depth: int) -> int:
    return queue_depth + 2


class Capture:
    """Takes host copies of the matrices of ``sources`` in ``dtype``. Every rank calls :meth:`take`
    (a sharded W is gathered collectively); only the writing rank gets tensors back."""

    def __init__(self, sources: dict[str, MatrixSource], dtype: torch.dtype, queue_depth: int, writes: bool,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.sources = sources
        self.dtype = dtype
        self.writes = writes
        self._gather = gather
        self._ring: dict[str, list[torch.Tensor]] = {}
        self._size = ring_size(queue_depth)
        self._taken = 0

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        ring = self._ring.get(name)
        if ring is None:
            pin = like.device.type == "cuda"
            ring = self._ring[name] = [torch.empty(like.shape, dtype=self.dtype, pin_memory=pin)
                                       for _ in range(self._size)]
        return ring[self._taken % self._size]

    def take(self) -> tuple[dict[str, torch.Tensor], object | None]:
        """(host tensors by name, a CUDA event to wait on or None); empty on ranks that do not write."""
        with self._gather() if self._gather is not None else contextlib.nullcontext():
            matrices = {name: source.matrix() for name, source in self.sources.items()}  # collective if sharded
            if not self.writes:
                return {}, None
            tensors, on_cuda = {}, False
            for name, w in matrices.items():
                buf = self._buffer(name, w)
                on_cuda = on_cuda or w.device.type == "cuda"
                buf.copy_(w, non_blocking=w.device.type == "cuda")
                tensors[name] = buf
        self._taken += 1
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        return tensors, event

    @property
    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for ring in self._ring.values() for b in ring)
