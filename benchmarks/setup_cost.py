"""Benchmark 3: what the callback's setup-time forecast costs (time and peak RSS).

analytic: module counts over a meta GPT(preset("gpt2-xl")) (parameters, tensors, state-dict
  entries: what the callback reads from the module) + budget_callback.forecast.forecast with
  PlanInputs(preset("gpt2-xl"), bf16-mixed, micro-batch 8, seq 1024, 20,000 steps, an 80 GB memory
  budget so the largest-batch and fewest-devices searches run). Target < 1 s.
traced: tracing.trace_training_step_memory on a meta GPT(preset("gpt2")), batch 1, seq 1024,
  AdamW, + memory.peak_memory_from_trace. Target < 15 s.
Each run is a fresh subprocess, so its peak RSS (resource.getrusage ru_maxrss) is its own;
the RSS right after the imports is reported next to it. Building the meta module is timed apart
(in a real run the module already exists).

    python benchmarks/setup_cost.py     # ~1.5 min here
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(kind: str) -> None:
    import torch

    from budget_callback.forecast import Budgets, Measured, PlanInputs, SnapshotSpec, forecast
    from budget_callback.models.gpt import GPT
    from budget_callback.forecast.memory import TrainSetup, peak_memory_from_trace
    from budget_callback.lightning.inputs import module_counts, state_dict_entries
    from budget_callback.forecast.shapes import preset
    from budget_callback.lightning.tracing import trace_training_step_memory

    rss_imports = rss_mib()
    name = "gpt2-xl" if kind == "analytic" else "gpt2"
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = GPT(preset(name))
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "analytic":
        n, k = module_counts(model)
        entries = state_dict_entries(model)
        inputs = PlanInputs(preset(name), TrainSetup(micro_batch_size=8, seq_len=1024, precision="bf16-mixed"),
                            steps=20_000, snapshot=SnapshotSpec(10), budgets=Budgets(memory_bytes=80 * 10**9))
        f = forecast(inputs, Measured(n, k, entries), free_disk_bytes=10**12)
        result = f.memory["peak_bytes"]
    else:
        batch = (torch.zeros(1, 1024, dtype=torch.long, device="meta"),) * 2
        trace = trace_training_step_memory(model, batch, lambda m, b: m(*b)[1], torch.optim.AdamW)
        result = peak_memory_from_trace(trace, TrainSetup(micro_batch_size=1, seq_len=1024))["peak_bytes"]
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "build": build, "rss_imports": rss_imports, "rss_peak": rss_mib(),
                      "peak_bytes": result}))


def main() -> int:
    from common import log, median, spread, table, verdict, write_section

    plan = [("analytic", 5, 1.0), ("traced", 3, 15.0)]
    rows = []
    for kind, reps, target in plan:
        runs = []
        for r in range(reps):
            out = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"{kind} run {r + 1}/{reps}: {runs[-1]['seconds']:.3f} s, peak RSS {runs[-1]['rss_peak']:.0f} MiB")
        secs = [x["seconds"] for x in runs]
        what = ("analytic: counts over meta GPT(gpt2-xl) + forecast() (1.56G params, 48 layers)" if kind == "analytic"
                else "traced: trace_training_step_memory, meta GPT(gpt2), batch 1 x 1024, AdamW")
        rows.append([what, f"{median(secs):.3f} s", spread(secs, "{:.3f}") + " s", f"< {target:g} s",
                     verdict(median(secs) < target),
                     f"{median([x['rss_peak'] for x in runs]):.0f} MiB (after imports "
                     f"{median([x['rss_imports'] for x in runs]):.0f} MiB)",
                     f"{median([x['build'] for x in runs]):.3f} s", "`python benchmarks/setup_cost.py`"])
    md = "## 3. Setup cost\n\nEach run in a fresh subprocess (peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss`).\n\n" + table(
        ["forecast", "median time", "spread (min–max)", "target", "result", "peak RSS (median)",
         "meta module build (not in the time)", "command"], rows)
    write_section("setup_cost", md)
    print(md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        sys.exit(main())
