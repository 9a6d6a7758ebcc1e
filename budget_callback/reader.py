"""Read a snapshot directory lazily: ``SnapshotReader(dir).trajectory(token_id)``."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .writer import MANIFEST, is_temporary

NAMES = ("unembedding", "embedding")


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, without reading its data."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


class SnapshotReader:
    """Snapshots written by :class:`BudgetCallback`, in either file layout.

    ``steps`` lists the optimizer steps that have a snapshot; ``load(step)``
    returns W ``(V, D)`` in the stored dtype; ``trajectory(token_id)`` returns
    that token's row at every step ``(len(steps), D)``, reading only those rows.
    """

    def __init__(self, snapshot_dir: str | os.PathLike) -> None:
        self.directory = Path(snapshot_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"`snapshot_dir` {str(self.directory)!r} is not a directory")
        manifest_path = self.directory / MANIFEST
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        self._index: dict[int, tuple[Path, int | None]] = {}
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if not entry.name.endswith(".safetensors") or is_temporary(entry.name) or entry.name.startswith("."):
                continue
            header = read_header(entry.path)
            meta = header.get("__metadata__") or {}
            if "first_step" not in meta or "unembedding" not in header:
                continue
            first, count, every = int(meta["first_step"]), int(meta["count"]), int(meta["every"])
            stacked = len(header["unembedding"]["shape"]) == 3
            for j in range(count):
                self._index[first + j * every] = (Path(entry.path), j if stacked else None)
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
        if name == "embedding" and "embedding" not in self.manifest.get("names", ["embedding"]):
            raise KeyError("no embedding stored: train with BudgetCallback(include_embedding=True)")
        return name

    def _locate(self, step: int) -> tuple[Path, int | None]:
        try:
            return self._index[step]
        except KeyError:
            raise KeyError(f"no snapshot at step {step}; steps run from {self.steps[:1]} to {self.steps[-1:]}") from None

    def load(self, step: int, name: str = "unembedding") -> torch.Tensor:
        """W (or E) at optimizer step ``step``, shape ``(V, D)``, in the stored dtype."""
        key = self._name(name)
        path, slot = self._locate(step)
        with safe_open(str(path), framework="pt") as fh:
            if slot is None:
                return fh.get_tensor(key)
            return fh.get_slice(key)[slot]

    def trajectory(self, token_id: int, name: str = "unembedding") -> torch.Tensor:
        """Row ``token_id`` at every step, ``(len(steps), D)``; reads only those rows."""
        key = self._name(name)
        vocab = self.manifest.get("vocab_size")
        if vocab is not None and not 0 <= token_id < vocab:
            raise IndexError(f"`token_id` must be in [0, {vocab}), got {token_id}")
        rows = []
        by_file: dict[Path, list[int | None]] = {}
        for step in self.steps:
            path, slot = self._index[step]
            by_file.setdefault(path, []).append(slot)
        for path, slots in by_file.items():
            with safe_open(str(path), framework="pt") as fh:
                part = fh.get_slice(key)
                if slots == [None]:
                    rows.append(part[token_id : token_id + 1])
                else:
                    block = part[:, token_id : token_id + 1]  # (K, 1, D)
                    rows.append(block[: len(slots), 0])
        if not rows:
            return torch.empty(0, self.manifest.get("hidden_dim", 0))
        return torch.cat(rows, dim=0)
