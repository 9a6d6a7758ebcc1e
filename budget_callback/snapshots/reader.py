"""Read a snapshot directory lazily: ``SnapshotReader(dir).trajectory(token_id)``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .directory import SnapshotFile, scan
from .format import NAMES


class SnapshotReader:
    """Snapshots written by :class:`~budget_callback.BudgetCallback`, in either file layout.

    ``steps`` lists the optimizer steps that have a snapshot; ``load(step)``
    returns W ``(V, D)`` in the stored dtype; ``trajectory(token_id)`` returns
    that token's row at every step ``(len(steps), D)``, reading only those rows.
    A stray, foreign or truncated file never hides the valid snapshots: it is
    left out, named in a warning and in ``bad_files``.
    """

    def __init__(self, snapshot_dir: str | os.PathLike) -> None:
        self.directory = Path(snapshot_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"`snapshot_dir` {str(self.directory)!r} is not a directory")
        found = scan(self.directory)
        self.manifest = found.manifest or {}
        self.bad_files = {b.path.name: b.reason for b in found.bad}
        self._index: dict[int, tuple[SnapshotFile, int | None]] = {}
        shapes = set()
        for f in found.files:
            shapes.add(tuple(f.tensors["unembedding"]["shape"][-2:]))
            for j, step in enumerate(f.steps):
                self._index[step] = (f, j if f.stacked else None)
        if found.bad:
            warnings.warn(f"SnapshotReader: {len(found.bad)} file(s) in {str(self.directory)!r} are not readable "
                          "snapshots and are left out: " + "; ".join(b.line() for b in found.bad[:5]), stacklevel=2)
        if len(shapes) > 1:
            raise ValueError(f"snapshot files in {str(self.directory)!r} hold matrices of different shapes "
                             f"{sorted(shapes)}: more than one series")
        self.shape = next(iter(shapes), None)  # (V, D)
        self.steps: list[int] = sorted(self._index)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"SnapshotReader({str(self.directory)!r}, {len(self)} snapshots)"

    def _name(self, name: str) -> str:
        if name not in NAMES:
            raise ValueError(f"`name` must be one of {', '.join(NAMES)}, got {name!r}")
        if name == "embedding" and self.manifest.get("tied"):
            return "unembedding"  # tied: E is W, stored once
        if name == "embedding" and not any("embedding" in f.tensors for f, _ in self._index.values()):
            raise KeyError("no embedding stored: train with BudgetCallback(include_embedding=True)")
        return name

    def _locate(self, step: int) -> tuple[SnapshotFile, int | None]:
        try:
            return self._index[step]
        except KeyError:
            raise KeyError(f"no snapshot at step {step}; steps run from {self.steps[:1]} to {self.steps[-1:]}") from None

    def _open(self, f: SnapshotFile):
        try:
            return safe_open(str(f.path), framework="pt")
        except (OSError, SafetensorError) as err:
            raise OSError(f"snapshot file {f.path.name} cannot be read: {err}") from err

    def load(self, step: int, name: str = "unembedding") -> torch.Tensor:
        """W (or E) at optimizer step ``step``, shape ``(V, D)``, in the stored dtype."""
        key = self._name(name)
        f, slot = self._locate(step)
        with self._open(f) as fh:
            if slot is None:
                return fh.get_tensor(key)
            return fh.get_slice(key)[slot]

    def trajectory(self, token_id: int, name: str = "unembedding") -> torch.Tensor:
        """Row ``token_id`` at every step, ``(len(steps), D)``; reads only those rows."""
        key = self._name(name)
        vocab = self.shape[0] if self.shape else self.manifest.get("vocab_size")
        if isinstance(token_id, bool) or not isinstance(token_id, int) or vocab is not None and not 0 <= token_id < vocab:
            raise IndexError(f"`token_id` must be an int in [0, {vocab}), got {token_id!r}")
        rows = []
        by_file: dict[Path, tuple[SnapshotFile, list[int | None]]] = {}
        for step in self.steps:
            f, slot = self._index[step]
            by_file.setdefault(f.path, (f, []))[1].append(slot)
        for f, slots in by_file.values():
            with self._open(f) as fh:
                part = fh.get_slice(key)
                if slots == [None]:
                    rows.append(part[token_id : token_id + 1])
                else:
                    rows.append(part[:, token_id : token_id + 1][: len(slots), 0])
        if not rows:
            return torch.empty(0, self.shape[1] if self.shape else self.manifest.get("hidden_dim", 0))
        return torch.cat(rows, dim=0)
