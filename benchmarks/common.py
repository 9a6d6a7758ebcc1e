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


def conditions() -> str:
    """The machine's load and I/O pressure now (Linux; "n/a" where /proc/pressure is missing)."""
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    try:
        fields = dict(kv.split("=") for kv in open("/proc/pressure/io").read().split("\n")[0].split()[1:])
        io = f"{fields['avg10']}% / {fields['avg60']}% (avg10 / avg60)"
    except OSError:
        io = "n/a"
    return f"load average {load}; I/O pressure {io}"


def warm_all(files) -> None:
    """Read every file once, so that it is in the page cache."""
    for p in files:
        with open(p, "rb") as fh:
            while fh.read(8 << 20):
                pass


READER_PATTERN = "(7*token + d + 31*step) % 32749 as int16"


def reader_base(V: int, D: int):
    """``7 * token + d``, (V, D) int32: the reader benchmarks' matrix at step s is ``(base + 31 s) % 32749``."""
    import torch

    return torch.arange(V, dtype=torch.int32)[:, None] * 7 + torch.arange(D, dtype=torch.int32)[None, :]


def write_reader_data(d: Path, V: int, D: int, K: int, S: int, fresh: bool) -> str:
    """S snapshots of V x D bf16 (``READER_PATTERN``), K per file, written into ``d`` by the product's writer
    (fsync off, then one sync) and kept between runs of any benchmark that asks for the same series."""
    import json
    import queue
    import shutil

    import torch

    from budget_callback.snapshots.format import SnapshotLayout
    from budget_callback.snapshots.image import FileImage
    from budget_callback.snapshots.schedule import Schedule
    from budget_callback.snapshots.series import Series
    from budget_callback.snapshots.writer import SnapshotWriter

    spec = {"V": V, "D": D, "K": K, "S": S, "pattern": READER_PATTERN}
    marker = d.parent / f"{d.name}.json"
    if not fresh and marker.exists() and json.loads(marker.read_text()) == spec and d.is_dir():
        return "reused from an earlier run (`--fresh-data` rewrites it)"
    d.parent.mkdir(parents=True, exist_ok=True)
    free_bytes, need = shutil.disk_usage(d.parent).free, S * (V * D * 2 + 4096)
    if need > free_bytes * 0.8:
        raise SystemExit(f"{need / 1e9:.1f} GB of snapshots do not fit the {free_bytes / 1e9:.1f} GB free under "
                         f"{d.parent}: make a smaller series")
    marker.unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    layout = SnapshotLayout(V, D, "bfloat16", K)
    series = Series(d, layout, "bench-reader", Schedule.start(layout, 1), fsync=False)
    series.write_manifest()
    writer = SnapshotWriter(series)
    writer.start()
    free: queue.Queue = queue.Queue()
    for _ in range(8):
        free.put(FileImage(layout))
    base = reader_base(V, D)
    for step in range(1, S + 1):
        p = series.place(step)
        image = free.get()
        image.prepare(p.step, p.every)["unembedding"].view(torch.int16).copy_(((base + 31 * step) % 32749).to(torch.int16))
        writer.submit(p, image, release=lambda image=image: free.put(image))
    writer.close()
    os.sync()
    marker.write_text(json.dumps(spec))
    return f"written by SnapshotWriter (fsync off, then one sync) in {time.perf_counter() - t0:.0f} s"


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
