"""Shared helpers for the benchmarks: statistics, machine facts, result files.

Every benchmark script writes its markdown section to ``benchmarks/results/<name>.md``;
``benchmarks/run_all.py`` assembles them into BENCHMARKS.md. Temporary files go under
``/tmp/bench`` (override with ``BENCH_TMP``), never into the repository.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TMP = Path(os.environ.get("BENCH_TMP", "/tmp/bench"))
PY = "python"  # how commands are shown in the tables (run from the repository root)


def tmp_dir(name: str) -> Path:
    path = TMP / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def timed_writer(directory: Path, layout, tensor, n: int):
    """Write ``n`` snapshots of ``tensor`` with the callback's writer (fsync on) into a fresh ``directory``:
    file images filled as the capture fills them, submitted back to back.

    Returns (seconds from the first submit to the last file durable, bytes written).
    """
    import shutil

    from budget_callback.snapshots.image import FileImage
    from budget_callback.snapshots.schedule import Schedule
    from budget_callback.snapshots.series import Series
    from budget_callback.snapshots.writer import SnapshotWriter

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    series = Series(directory, layout, "bench", Schedule.start(layout, 1))
    writer = SnapshotWriter(series)
    writer.start()
    import queue

    free: queue.Queue = queue.Queue()
    for _ in range(4):  # a ring of images, as the capture keeps
        free.put(FileImage(layout))
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        placement = series.place(step)
        image = free.get()  # waits while every image is still being written
        for view in image.prepare(placement.step, placement.every).values():
            view.copy_(tensor)
        writer.submit(placement, image, release=lambda image=image: free.put(image))
    writer.close()
    seconds = time.perf_counter() - t0
    shutil.rmtree(directory, ignore_errors=True)
    return seconds, series.bytes_written


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs, fmt: str = "{:.3g}") -> str:
    """``min–max`` of the runs (n given), the spread every row reports."""
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))} (n={len(xs)})"


def iqr(xs) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "**MISS**")


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def write_section(name: str, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    path.write_text(markdown.rstrip() + f"\n\n_Measured {stamp}; `{' '.join([PY] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`._\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def machine() -> str:
    """Machine and library versions, as a markdown list."""
    import lightning
    import safetensors
    import torch
    import wandb

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "\n".join([
        f"- CPU: {cpu}, {os.cpu_count()} cores visible (torch threads: {torch.get_num_threads()}), no GPU",
        f"- RAM: {ram / 2**30:.1f} GiB; temporary files under `{TMP}` ({_fs(TMP)})",
        f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"wandb {wandb.__version__}, safetensors {safetensors.__version__}",
        f"- OS: {platform.platform()}",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "- The machine is shared and noisy: every ratio below is measured side by side in one run "
        "(with/without alternating), medians over several runs, spread as min–max.",
    ])


def _fs(path: Path) -> str:
    """Device and type of the file system holding ``path`` (longest matching mount point)."""
    best = ("", "unknown", "")
    try:
        target = str(path.resolve())
        for line in open("/proc/mounts"):
            dev, mnt, kind = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, dev, kind)
    except OSError:
        pass
    return f"file system {best[1]} {best[2]} mounted at {best[0]}"
