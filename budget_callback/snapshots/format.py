"""The snapshot file format: names, metadata and the exact size of every file (pure: no torch).

A safetensors file is ``8`` (little-endian u64 header length) + the JSON header
padded with spaces to a multiple of 8 + the raw tensor data. The header is
compact JSON: ``{"__metadata__":{...},"<name>":{"dtype":"BF16","shape":[V,D],
"data_offsets":[a,b]},...}``. Its length does not depend on key order, so the
size of every file is known exactly before anything is written.

A file holds ``count`` snapshots: W as ``unembedding`` (and E as
``embedding``), shape ``(V, D)`` when ``snapshots_per_file == 1``, else
``(count, V, D)``. Its metadata names the optimizer steps it holds:
``first_step``, ``count`` and ``every`` (the interval), plus ``steps`` (the
list, comma-separated) only when the steps are not ``first_step + i * every``
(several optimizer steps per batch, see :mod:`.schedule`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass

from ..units import format_bytes
from ..validate import one_of, positive_int

SNAPSHOT_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
MAX_SNAPSHOTS_PER_FILE = 1 << 20  # a file of more snapshots than this is never what anyone wants
SNAPSHOT_FORMAT = "budget-callback/1"
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NAMES = ("unembedding", "embedding")
MANIFEST = "manifest.json"
LOCK_FILE = ".budget-callback.lock"
TMP_MARK = ".tmp-"  # our temporaries: ".<final name>.tmp-<pid>"
_SAFETENSORS_TMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own (Rust tempfile) temporary


def snapshot_name(first_step: int) -> str:
    """File name of the file whose first snapshot is at ``first_step``."""
    return f"step_{first_step:09d}.safetensors"


def step_of_name(name: str) -> int | None:
    """The first step a snapshot file name (``step_`` and 9 or more decimal digits, ``.safetensors``) stands
    for; None for any other name. (String tests, not a regular expression: a scan calls this once per file.)"""
    if name.startswith("step_") and name.endswith(".safetensors"):
        digits = name[5:-12]
        if len(digits) >= 9 and digits.isdecimal():
            return int(digits)
    return None


def is_temporary(name: str) -> bool:
    """A temporary left by a writer: ours (``.x.tmp-123``) or safetensors' own (``.tmpAbC123``)."""
    return name.startswith(".") and (TMP_MARK in name or bool(_SAFETENSORS_TMP_RE.match(name)))


def temporary_name(final_name: str, pid: int) -> str:
    return f".{final_name}{TMP_MARK}{pid}"


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for dim in shape:
        n *= dim
    return n


def encode_header(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header, data laid out in name order (as safetensors does for
    tensors of one dtype). ``len(result) == 8 + safetensors_header_bytes(tensors, metadata)``."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def safetensors_header_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None) -> int:
    """Length of the padded JSON header for ``tensors`` = {name: (safetensors dtype, shape)}."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return -(-raw // 8) * 8


def safetensors_file_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> int:
    """Exact size of the safetensors file holding ``tensors`` (no tensor is allocated)."""
    data = sum(_nbytes(dtype, shape) for dtype, shape in tensors.values())
    return 8 + safetensors_header_bytes(tensors, metadata) + data


def is_regular(steps: list[int], every: int) -> bool:
    """True when ``steps`` are ``steps[0] + i * every`` (the metadata needs no explicit list)."""
    return all(b - a == every for a, b in zip(steps, steps[1:]))


@dataclass(frozen=True)
class SnapshotLayout:
    """What one snapshot file holds. Shared by the forecast and the writer so they cannot drift."""

    vocab_size: int
    hidden_dim: int
    dtype: str = "bfloat16"  # "float32" | "bfloat16" | "float16"
    snapshots_per_file: int = 1
    include_embedding: bool = False  # store E next to W (skipped when tied: E is W)
    tied: bool = False

    def __post_init__(self) -> None:
        positive_int("vocab_size", self.vocab_size)
        positive_int("hidden_dim", self.hidden_dim)
        one_of("snapshot_dtype", self.dtype, SNAPSHOT_DTYPES)
        positive_int("snapshots_per_file", self.snapshots_per_file)

    @property
    def names(self) -> tuple[str, ...]:
        return NAMES if self.include_embedding and not self.tied else NAMES[:1]

    @property
    def itemsize(self) -> int:
        return SNAPSHOT_DTYPES[self.dtype][1]

    @property
    def matrix_bytes(self) -> int:
        """Raw bytes of one (V, D) matrix in the snapshot dtype."""
        return self.vocab_size * self.hidden_dim * self.itemsize

    @property
    def step_bytes(self) -> int:
        """Raw tensor bytes captured per snapshot step (what the host buffers hold)."""
        return len(self.names) * self.matrix_bytes

    @property
    def stacked(self) -> bool:
        return self.snapshots_per_file > 1

    def metadata(self, first_step: int, count: int, every: int, steps: list[int] | None = None) -> dict[str, str]:
        """The file's metadata; ``steps`` only when they are not ``first_step + i * every``."""
        meta = {"format": SNAPSHOT_FORMAT, "first_step": str(first_step), "count": str(count), "every": str(every)}
        if steps is not None and count > 1 and not is_regular(steps, every):
            meta["steps"] = ",".join(map(str, steps))
        return meta

    def tensors(self, count: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        shape = (count, self.vocab_size, self.hidden_dim) if self.stacked else (self.vocab_size, self.hidden_dim)
        code = SNAPSHOT_DTYPES[self.dtype][0]
        return {name: (code, shape) for name in self.names}

    def file_bytes(self, first_step: int, count: int, every: int, steps_chars: int | None = None) -> int:
        """Exact bytes of the file holding ``count`` snapshots from ``first_step`` every ``every`` steps.

        ``steps_chars``: length of the explicit ``steps`` list when the steps are irregular.
        """
        meta = self.metadata(first_step, count, every)
        if steps_chars is not None and count > 1:
            meta["steps"] = "0" * steps_chars  # only its length matters: digits and commas need no escaping
        return safetensors_file_bytes(self.tensors(count), meta)

    def file_bytes_for(self, steps: list[int], every: int) -> int:
        """Exact bytes of the file holding the snapshots of ``steps`` (in order)."""
        chars = None if is_regular(steps, every) else len(",".join(map(str, steps)))
        return self.file_bytes(steps[0], len(steps), every, chars)

    def to_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "hidden_dim": self.hidden_dim, "dtype": self.dtype,
                "snapshots_per_file": self.snapshots_per_file, "include_embedding": self.include_embedding,
                "tied": self.tied, "names": list(self.names)}


PAGE = 4096  # host buffers and O_DIRECT writes are aligned to this
WIDEST_STEP = 10**20  # the widest step a reused buffer's header must hold


def image_bytes(layout: SnapshotLayout) -> int:
    """Bytes of one reused host buffer holding a whole snapshot file (header for any step + data)."""
    widest = layout.file_bytes(WIDEST_STEP, 1, WIDEST_STEP) if not layout.stacked else \
        SnapshotLayout(layout.vocab_size, layout.hidden_dim, layout.dtype, 1, layout.include_embedding,
                       layout.tied).file_bytes(WIDEST_STEP, 1, WIDEST_STEP)
    return -(-(widest + 64) // PAGE) * PAGE


HOST_RAM_SHARE = 0.25  # the snapshot ring holds at most this share of the host RAM available when training starts
RING_MIN_BUFFERS = 3  # one being filled, one waiting, one being written: the copy overlaps the write
RING_SAMPLES = 16  # recent writes and snapshot intervals the ring is sized from


def ring_size(queue_depth: int) -> int:
    """Host buffers per matrix at most: one being filled, ``queue_depth`` waiting for the writer, one being
    written."""
    return queue_depth + 2


def host_buffer_bytes(layout: SnapshotLayout, queue_depth: int, buffers: int | None = None) -> int:
    """Host RAM the snapshots take: ``buffers`` file images (default ``ring_size(queue_depth)``), and a stacked
    file's K slots while it fills."""
    stack = layout.snapshots_per_file * layout.step_bytes if layout.stacked else 0
    return (ring_size(queue_depth) if buffers is None else buffers) * image_bytes(layout) + stack


@dataclass(frozen=True)
class RingCap:
    """The most file images the snapshot ring may hold (``buffers``), the host RAM that takes with a stacked
    file's slots (``total_bytes``), and why (``basis``, for people)."""

    buffers: int
    total_bytes: int
    basis: str
    available_bytes: int | None  # host RAM available when training starts; None: not known (the CLI's plan)
    share: float = HOST_RAM_SHARE


def ring_cap(layout: SnapshotLayout, queue_depth: int, available_bytes: int | None,
             share: float = HOST_RAM_SHARE) -> RingCap:
    """The ring's cap: ``queue_depth + 2`` file images, or fewer where those would take more than ``share`` of
    ``available_bytes`` (after a stacked file's slots): as many as fit, never fewer than ``RING_MIN_BUFFERS``
    (the callback refuses a run where even those do not fit the available RAM at all)."""
    depth, image = ring_size(queue_depth), image_bytes(layout)
    stack = host_buffer_bytes(layout, queue_depth, 0)
    slots = f" + the stacked file's {layout.snapshots_per_file} slots" if stack else ""
    depth_text = f"queue_depth {queue_depth} + 2"
    if available_bytes is None:
        return RingCap(depth, depth * image + stack, f"{depth} file images{slots}: {depth_text}; when training "
                       f"starts, also at most {share:.0%} of the host RAM available", None, share)
    fit = max(0, int(available_bytes * share) - stack) // image
    where = f"{share:.0%} of the {format_bytes(available_bytes)} of host RAM available"
    if fit >= depth:
        buffers, basis = depth, f"{depth} file images{slots}: {depth_text}, within {where}"
    elif fit >= RING_MIN_BUFFERS:
        buffers, basis = fit, (f"{fit} file images{slots}: as many as fit in {where} ({depth_text} would take "
                               f"{format_bytes(depth * image + stack)})")
    else:
        buffers, basis = RING_MIN_BUFFERS, (f"{RING_MIN_BUFFERS} file images{slots}, the fewest that overlap the "
                                            f"copy with the write: more than {where}")
    return RingCap(buffers, buffers * image + stack, basis, available_bytes, share)


def ring_buffers(write_seconds, interval_seconds, cap: int) -> tuple[int, str]:
    """How many buffers the ring may grow to now (at most ``cap``), and why, from the writer's recent times per
    file (``write_seconds``) and the training's own time between snapshots, waits left out (``interval_seconds``).

    A writer that keeps up on average needs ``2 + ceil(slowest write / interval)`` buffers: one being filled,
    one being written and those that arrive while the slowest write runs. A writer slower than the snapshots
    come (steps outrun the disk) cannot be caught up by any number of buffers: they would only postpone the
    wait, holding RAM, so the ring stays at ``RING_MIN_BUFFERS`` and training waits for the disk (or drops,
    ``when_behind="drop"``). Until three of each have been measured, ``RING_MIN_BUFFERS``."""
    least = min(cap, RING_MIN_BUFFERS)
    writes, intervals = list(write_seconds), sorted(interval_seconds)
    if len(writes) < 3 or len(intervals) < 3:
        return least, "not measured yet"
    mean_write, interval = sum(writes) / len(writes), intervals[len(intervals) // 2]
    if interval <= 0 or mean_write >= interval:
        return least, (f"disk-bound: a file takes {mean_write:.3g} s to write, snapshots come every {interval:.3g} s; "
                       "more buffers would only postpone the wait")
    need = 2 + math.ceil(max(writes) / interval)
    if need > cap:
        return cap, (f"the slowest recent write ({max(writes):.3g} s) spans {need - 2} snapshot intervals of "
                     f"{interval:.3g} s; the ring is capped at {cap} buffers")
    return max(least, need), (f"the slowest recent write ({max(writes):.3g} s) spans {need - 2} snapshot "
                              f"interval(s) of {interval:.3g} s")
