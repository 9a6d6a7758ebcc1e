"""Disk forecasts: exact snapshot file sizes, counts, checkpoints, the interval solver.

A safetensors file is ``8`` (little-endian u64 header length) + the JSON
header padded with spaces to a multiple of 8 + the raw tensor data. The header
is compact JSON: ``{"__metadata__":{...},"<name>":{"dtype":"BF16","shape":[V,D],
"data_offsets":[a,b]},...}``. Its length does not depend on key order, so we
can compute it exactly without writing anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .validate import one_of, positive_int

SNAPSHOT_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
SNAPSHOT_FORMAT = "budget-callback/1"
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for dim in shape:
        n *= dim
    return n


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
        one_of("snapshot_dtype", self.dtype, SNAPSHOT_DTYPES)
        positive_int("snapshots_per_file", self.snapshots_per_file)

    @property
    def names(self) -> tuple[str, ...]:
        return ("unembedding", "embedding") if self.include_embedding and not self.tied else ("unembedding",)

    @property
    def step_bytes(self) -> int:
        """Raw tensor bytes captured per snapshot step (what the host buffers hold)."""
        return len(self.names) * self.vocab_size * self.hidden_dim * SNAPSHOT_DTYPES[self.dtype][1]

    def metadata(self, first_step: int, count: int, every: int) -> dict[str, str]:
        return {
            "format": SNAPSHOT_FORMAT,
            "first_step": str(first_step),
            "count": str(count),
            "every": str(every),
        }

    def tensors(self, count: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        shape = (self.vocab_size, self.hidden_dim) if self.snapshots_per_file == 1 else (count, self.vocab_size, self.hidden_dim)
        code = SNAPSHOT_DTYPES[self.dtype][0]
        return {name: (code, shape) for name in self.names}

    def file_bytes(self, first_step: int, count: int, every: int) -> int:
        """Exact bytes of the file holding ``count`` snapshots from ``first_step`` every ``every`` steps."""
        return safetensors_file_bytes(self.tensors(count), self.metadata(first_step, count, every))

    def series_bytes(self, steps: int, every: int, start_step: int = 0) -> int:
        """Exact bytes of all files for snapshots at ``every, 2*every, ...`` up to ``steps``.

        Steps already covered (``<= start_step``) are excluded. Files are grouped
        by the digit count of their first step, so this is O(digits), not O(files).
        """
        first = (start_step // every + 1) * every
        if first > steps:
            return 0
        n_snapshots = (steps - first) // every + 1
        K = self.snapshots_per_file
        full_files, rest = divmod(n_snapshots, K)
        total = 0
        stride = every * K  # distance between first steps of consecutive files
        index = 0  # file index
        while index < full_files:
            first_step = first + index * stride
            digits = len(str(first_step))
            # last file index whose first step still has the same digit count
            limit = (10**digits - 1 - first) // stride
            last = min(full_files - 1, limit)
            total += (last - index + 1) * self.file_bytes(first_step, K, every)
            index = last + 1
        if rest:
            total += self.file_bytes(first + full_files * stride, rest, every)
        return total


def snapshot_count(steps: int, every: int) -> int:
    """Snapshots in a run of ``steps`` optimizer steps at interval ``every``."""
    return steps // every


def solve_interval(layout: SnapshotLayout, steps: int, requested: int, budget_bytes: int) -> int | None:
    """Smallest ``every >= requested`` whose snapshot total fits ``budget_bytes``.

    Returns ``None`` when not even one snapshot fits. The exact total is not
    monotone in ``every`` (header digits grow with the step numbers), so we
    find the first interval whose lower bound fits and scan upwards exactly.
    """
    if budget_bytes < 0:
        return None
    if layout.series_bytes(steps, requested) <= budget_bytes:
        return requested
    if requested > steps:
        return requested
    K = layout.snapshots_per_file
    # Lower bound per snapshot: the data plus the smallest header (fewest digits) shared by K.
    per_snapshot_floor = layout.step_bytes + (layout.file_bytes(1, 1, 1) - layout.step_bytes) / K
    lo, hi = requested, steps + 1  # smallest every whose lower bound fits (monotone in every)
    while lo < hi:
        mid = (lo + hi) // 2
        if snapshot_count(steps, mid) * per_snapshot_floor <= budget_bytes:
            hi = mid
        else:
            lo = mid + 1
    # No every below ``lo`` can fit; scan upwards exactly (a few candidates at most).
    for every in range(lo, steps + 1):
        if layout.series_bytes(steps, every) <= budget_bytes:
            return every
    return None
