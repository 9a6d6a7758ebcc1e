"""``BudgetCallback``'s arguments as one validated dataclass (every check names the argument)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..forecast.budgets import POLICIES
from ..snapshots.format import MAX_SNAPSHOTS_PER_FILE, SNAPSHOT_DTYPES
from ..snapshots.writer import WHEN_BEHIND
from ..units import parse_size
from ..validate import boolean, one_of, positive_int


@dataclass(frozen=True)
class BudgetConfig:
    """What the user asked for. Sizes are ints of bytes; ``snapshot_dir`` is absolute, symbolic links resolved
    (once)."""

    snapshot_dir: Path
    save_every_n_steps: int = 1
    snapshot_dtype: str = "bfloat16"
    snapshots_per_file: int = 1
    unembedding: str | Callable | None = None
    include_embedding: bool = False
    disk_budget: int | None = None
    memory_budget: int | None = None
    wandb_budget: int | None = None
    on_exceed: str = "downsample"
    queue_depth: int = 4
    when_behind: str = "wait"
    overwrite: bool = False
    fsync: bool = True
    verbose: bool = True

    @classmethod
    def from_arguments(cls, snapshot_dir, save_every_n_steps, snapshot_dtype, snapshots_per_file, unembedding,
                       include_embedding, disk_budget, memory_budget, wandb_budget, on_exceed, queue_depth,
                       when_behind, overwrite, fsync, verbose) -> BudgetConfig:
        if not isinstance(snapshot_dir, (str, os.PathLike)) or str(snapshot_dir) == "":
            raise ValueError(f"`snapshot_dir` must be a path (str or os.PathLike), got {snapshot_dir!r}")
        if "\x00" in os.fsdecode(os.fspath(snapshot_dir)):
            raise ValueError(f"`snapshot_dir` must not contain a NUL byte, got {snapshot_dir!r}")
        positive_int("save_every_n_steps", save_every_n_steps)
        one_of("snapshot_dtype", snapshot_dtype, SNAPSHOT_DTYPES)
        positive_int("snapshots_per_file", snapshots_per_file)
        if snapshots_per_file > MAX_SNAPSHOTS_PER_FILE:
            raise ValueError(f"`snapshots_per_file` must be at most {MAX_SNAPSHOTS_PER_FILE:,} (one file holds them "
                             f"all in host RAM while it fills), got {snapshots_per_file:,}")
        if unembedding is not None and not isinstance(unembedding, str) and not callable(unembedding):
            raise ValueError(f"`unembedding` must be None, a parameter name or a callable, got {unembedding!r}")
        for name, value in (("include_embedding", include_embedding), ("overwrite", overwrite), ("fsync", fsync),
                            ("verbose", verbose)):
            boolean(name, value)
        one_of("on_exceed", on_exceed, POLICIES)
        positive_int("queue_depth", queue_depth)
        one_of("when_behind", when_behind, WHEN_BEHIND)
        return cls(
            # symbolic links resolved: a link and the directory it points to are one series, one state key
            snapshot_dir=Path(os.path.realpath(os.path.expanduser(os.fsdecode(os.fspath(snapshot_dir))))),
            save_every_n_steps=save_every_n_steps, snapshot_dtype=snapshot_dtype,
            snapshots_per_file=snapshots_per_file, unembedding=unembedding, include_embedding=include_embedding,
            disk_budget=None if disk_budget is None else parse_size(disk_budget, "disk_budget"),
            memory_budget=None if memory_budget is None else parse_size(memory_budget, "memory_budget"),
            wandb_budget=None if wandb_budget is None else parse_size(wandb_budget, "wandb_budget"),
            on_exceed=on_exceed, queue_depth=queue_depth, when_behind=when_behind, overwrite=overwrite, fsync=fsync,
            verbose=verbose,
        )
