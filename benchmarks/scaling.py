"""Benchmark 4: how the costs scale.

(a) Snapshot cost on the writer alone (SnapshotWriter, bf16, fsync on, queue_depth 4) from
    128 x 64 up to 256,000 x 2,048: seconds per snapshot and MB/s (n snapshots submitted back to
    back, timed until close(); 3 runs per size). 256,000 x 4,096 (2.1 GB per snapshot) is skipped:
    the tensor alone is over the ~2 GB RAM limit set for these benchmarks.
(b) The forecast's time against the number of layers (gpt2-like shapes, n_layer 1..96):
    forecast() without a memory budget, forecast() with an 80 GB budget (largest micro-batch and
    fewest devices searched), and the module counts the callback takes over a meta GPT; the
    slope of a least-squares fit of log(time) on log(n_layer) is the growth exponent.

    python benchmarks/scaling.py     # ~2 min here
"""

from __future__ import annotations

import math
import statistics
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, median, spread, table, timed_writer, tmp_dir, write_section  # noqa: E402

from budget_callback.forecast import Budgets, PlanInputs, forecast  # noqa: E402
from budget_callback.models.gpt import GPT  # noqa: E402
from budget_callback.forecast.memory import TrainSetup  # noqa: E402
from budget_callback.lightning.inputs import module_counts, state_dict_entries  # noqa: E402
from budget_callback.forecast.shapes import preset  # noqa: E402
from budget_callback.snapshots.format import SnapshotLayout  # noqa: E402

CMD = "`python benchmarks/scaling.py`"
SIZES = [(128, 64), (1_000, 256), (10_000, 64), (10_000, 768), (50_257, 768), (128_256, 1_024), (256_000, 1_024),
         (256_000, 2_048)]


def writer_run(V: int, D: int, n: int) -> tuple[float, int]:
    layout = SnapshotLayout(V, D, "bfloat16")
    w = torch.empty(V, D, dtype=torch.bfloat16).normal_()
    dt, written = timed_writer(tmp_dir("scaling") / "w", layout, w, n)
    return dt / n, written // n


def slope(xs, ys) -> float:
    return statistics.linear_regression([math.log(x) for x in xs], [math.log(y) for y in ys]).slope


def best_time(fn, repeat: int = 7) -> list[float]:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return [t / number for t in timer.repeat(repeat, number)]


def main() -> int:
    rows = []
    for V, D in SIZES:
        per = V * D * 2
        n = max(2, min(40, int(400e6 // per)))
        runs = []
        for r in range(3):
            sec, size = writer_run(V, D, n)
            runs.append(sec)
        log(f"writer {V} x {D}: {median(runs) * 1e3:.2f} ms per snapshot ({n} per run)")
        rows.append([f"{V:,} x {D:,}", f"{size:,}", n, f"{median(runs) * 1e3:,.2f} ms", spread([x * 1e3 for x in runs], "{:,.2f}") + " ms",
                     f"{size / median(runs) / 1e6:,.0f}", CMD])
    rows.append(["256,000 x 4,096", f"{SnapshotLayout(256_000, 4_096).file_bytes(1, 1, 1):,}", "—",
                 "skipped: 2.1 GB per snapshot, over the ~2 GB RAM limit", "—", "—", CMD])
    big = [(int(r[1].replace(",", "")), float(r[3].split()[0].replace(",", ""))) for r in rows[:-1]]
    s_bytes = slope([b for b, _ in big[-4:]], [t for _, t in big[-4:]])

    layers = [1, 2, 4, 8, 16, 32, 64, 96]
    series = {"forecast() (no memory budget)": [], "forecast() with 80 GB budget (batch/device searches)": [],
              "module counts over meta GPT (callback inputs)": []}
    spreads = {k: [] for k in series}
    for L in layers:
        shape = preset("gpt2", n_layer=L)
        setup = TrainSetup(micro_batch_size=8, seq_len=1024, precision="bf16-mixed")
        plain = PlanInputs(shape, setup, steps=20_000)
        budget = PlanInputs(shape, setup, steps=20_000, budgets=Budgets(memory_bytes=80 * 10**9))
        with torch.device("meta"):
            model = GPT(shape)
        fns = {
            "forecast() (no memory budget)": lambda: forecast(plain),
            "forecast() with 80 GB budget (batch/device searches)": lambda: forecast(budget),
            "module counts over meta GPT (callback inputs)": lambda: (module_counts(model), state_dict_entries(model)),
        }
        for k, fn in fns.items():
            ts = best_time(fn)
            series[k].append(median(ts))
            spreads[k].append(ts)
        log(f"n_layer {L}: " + ", ".join(f"{v[-1] * 1e3:.2f} ms" for v in series.values()))
    frows = []
    for i, L in enumerate(layers):
        frows.append([L] + [f"{series[k][i] * 1e3:.3f} ms ({spread([x * 1e3 for x in spreads[k][i]], '{:.3f}')})"
                            for k in series])
    frows.append(["log-log slope"] + [f"{slope(layers, series[k]):.2f}" for k in series])
    md = "\n".join([
        "## 4. Scaling",
        "",
        "### 4a. Snapshot cost on the writer alone (bf16, fsync on)",
        "",
        "`SnapshotWriter` alone, n snapshots of one random bf16 tensor submitted back to back, timed until `close()` "
        "(all files and the manifest fsynced); seconds per snapshot = time / n; 3 runs per size, median and min–max.",
        "",
        table(["V x D", "file bytes", "n per run", "seconds per snapshot (median)", "spread", "MB/s", "command"], rows),
        "",
        f"Slope of log(time) on log(bytes) over the four largest sizes: {s_bytes:.2f} (1.0 = linear in bytes; small "
        "sizes are dominated by the fixed per-file cost: fsyncs of file, directory and the manifest).",
        "",
        "### 4b. Forecast time against the number of layers (gpt2-like: V=50,257, D=768, H=12; micro-batch 8 x 1,024, "
        "bf16-mixed)",
        "",
        "`timeit` (autoranged number, 7 repeats): median per call, min–max in brackets.",
        "",
        table(["n_layer"] + list(series), frows),
        "",
        "Slope = least-squares fit of log(time) on log(n_layer): 0 = constant, 1 = linear.",
        "",
        f"Command: {CMD}",
    ])
    write_section("scaling", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
