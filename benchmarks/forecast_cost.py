"""What a forecast of a model's step costs at scale (issue 18): time and peak RSS, the stack cut and extrapolated
against the whole model traced.

1. `budget-callback plan --hf-config` of Llama-3-8B (32 x 4,096, V=128,256; transformers builds it on the meta
   device), micro-batch 1 x 2,048, eager and `--compile`. Targets: under 30 s eager and 60 s compiled, under
   1 GB of host RAM (peak RSS of the whole command). Needs `pip install transformers` (an anchor for the
   benchmark only; the package never depends on it): without it these rows say so.
2. The compiled fit-start measurement of GPT-2 XL (`lightning.measure.measure_module` on `torch.compile` of the
   reference GPT on the meta device, micro-batch 1 x 1,024, bf16-mixed, AdamW, at the run's own micro-batch as
   the fit start traces it): the stack cut to 1-3 blocks and extrapolated against the whole model traced.
   Target: under 20 s, within 1% of the whole trace.
3. The same, eager (reference).

Each row runs in its own subprocess (fresh dynamo state, its own peak RSS from `resource.getrusage`), one at a
time; wall seconds and the process's CPU seconds (both torch threads) are reported.

    python benchmarks/forecast_cost.py            # ~8 min here; writes benchmarks/results/forecast_cost.md
    python benchmarks/forecast_cost.py --repeat 5 # each row with a target 5 times (default 3)
    python benchmarks/forecast_cost.py --no-whole # without the whole-model traces (the slow reference)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "forecast_cost.md"
LLAMA_3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


_RSS = "import resource, sys; print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"


def _run(args: list[str], cwd: str | None = None) -> dict:
    """A Python subprocess, timed; its own peak RSS (it reports ``ru_maxrss`` as it exits) and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = ("import atexit, runpy, sys; atexit.register(lambda: exec(" + repr(_RSS) + ")); "
            f"sys.argv = {args[1:]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
            if not args[1] == "-m" else
            "import atexit, runpy, sys; atexit.register(lambda: exec(" + repr(_RSS) + ")); "
            f"sys.argv = {[args[2], *args[3:]]!r}; runpy.run_module({args[2]!r}, run_name='__main__')")
    proc = subprocess.run([args[0], "-c", code], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss = next((int(line.split()[1]) * 1024 for line in proc.stderr.splitlines() if line.startswith("RSS ")), 0)
    return {"rc": proc.returncode, "wall": wall, "cpu": (after.ru_utime - before.ru_utime) +
            (after.ru_stime - before.ru_stime), "rss_bytes": rss, "out": proc.stdout, "err": proc.stderr}


def child_measure(compiled: bool, extrapolate: bool) -> None:
    """In a subprocess: the fit-start measurement of GPT-2 XL on the meta device; prints one JSON line."""
    import warnings

    import torch
    from torch import nn

    from budget_callback.forecast.memory import TrainSetup
    from budget_callback.forecast.shapes import preset
    from budget_callback.lightning.measure import StepContext, measure_module
    from budget_callback.models.gpt import GPT
    from budget_callback.snapshots.format import SnapshotLayout

    warnings.filterwarnings("ignore")

    class LossOnly(nn.Module):  # the whole step compiled, as trainer.fit(torch.compile(model)) compiles it
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x, y):
            return self.model(x, y)[1]

    shape = preset("gpt2-xl")
    with torch.device("meta"):
        model = GPT(shape)
    module = torch.compile(LossOnly(model)) if compiled else model
    loss = (lambda m, b: m(b[0], b[1])) if compiled else (lambda m, b: m(b[0], b[1])[1])
    x = torch.empty(1, 1024, dtype=torch.long, device="meta")
    ctx = StepContext(TrainSetup(1, 1024, precision="bf16-mixed", optimizer_impl="fused"),
                      SnapshotLayout(shape.vocab_size, shape.d_model, "bfloat16"),
                      optimizers=[torch.optim.AdamW(model.parameters())], loss_fn=loss, extrapolate=extrapolate,
                      compiled_slope=False)  # as the fit start traces it (the slope only where the budget fails)
    t0 = time.perf_counter()
    measured, notes = measure_module(module, (x, x), ctx)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_bytes": measured.memory["peak_bytes"], "seconds": seconds, "method": measured.method,
                      "mode": measured.mode, "notes": notes}))


def _spread(values: list[float]) -> str:
    """Median (min–max, n) of the runs of one row; one run: the figure alone."""
    v = sorted(values)
    if len(v) == 1:
        return f"{v[0]:.1f}"
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{mid:.1f} ({v[0]:.1f}–{v[-1]:.1f}, n={len(v)})"


def _runs(args: list[str], n: int, cwd: str | None = None) -> list[dict]:
    """``n`` runs of one row, one after the other (stopping at a failure)."""
    out = []
    for _ in range(n):
        out.append(_run(args, cwd=cwd))
        if out[-1]["rc"] != 0:
            break
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_measure(argv[1] == "compiled", argv[2] == "extrapolate")
        return 0
    whole = "--no-whole" not in argv
    repeat = int(argv[argv.index("--repeat") + 1]) if "--repeat" in argv else 3
    rows = []
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA_3_8B))
        for compile_flag in ([], ["--compile"]):
            label = "Llama-3-8B `plan --hf-config`, " + ("compiled" if compile_flag else "eager")
            target = "60 s, 1 GB" if compile_flag else "30 s, 1 GB"
            if not have_hf:
                rows.append([label, target, "not run: transformers is not installed here", "", "", "", ""])
                continue
            runs = _runs([sys.executable, "-m", "budget_callback", "plan", "--hf-config", "config.json",
                          "--batch-size", "1", "--seq-len", "2048", "--gpu", "h100", "--json", *compile_flag],
                         repeat, cwd=tmp)
            if runs[-1]["rc"] != 0:
                rows.append([label, target, f"failed: {runs[-1]['err'][-300:]}", "", "", "", ""])
                continue
            d = json.loads(runs[-1]["out"])
            rows.append([label, target, _spread([r["wall"] for r in runs]), _spread([r["cpu"] for r in runs]),
                         f"{max(r['rss_bytes'] for r in runs) / 1e9:.2f} GB", f"{d['memory']['peak_bytes']:,}",
                         d["memory"]["activations_method"]])
            print(rows[-1], flush=True)
    measured = {}
    for compiled in (True, False):
        for extrapolate in (True, False) if whole else (True,):
            label = (f"GPT-2 XL fit-start measurement, {'compiled' if compiled else 'eager'}, "
                     f"{'stack cut, extrapolated' if extrapolate else 'whole model traced'}")
            runs = _runs([sys.executable, __file__, "--child", "compiled" if compiled else "eager",
                          "extrapolate" if extrapolate else "whole"], repeat if extrapolate else 1)
            if runs[-1]["rc"] != 0:
                rows.append([label, "", f"failed: {runs[-1]['err'][-300:]}", "", "", "", ""])
                continue
            ds = [json.loads(r["out"].strip().splitlines()[-1]) for r in runs]
            d = ds[-1]
            assert len({x["peak_bytes"] for x in ds}) == 1, "the runs of one row disagree"
            measured[(compiled, extrapolate)] = d["peak_bytes"]
            target = ("20 s, within 1% of the whole trace" if compiled and extrapolate else "reference")
            rows.append([label, target, f"{_spread([x['seconds'] for x in ds])} (process "
                         f"{_spread([r['wall'] for r in runs])})", _spread([r["cpu"] for r in runs]),
                         f"{max(r['rss_bytes'] for r in runs) / 1e9:.2f} GB", f"{d['peak_bytes']:,}", d["method"]])
            print(rows[-1], flush=True)
    lines = ["## 7. The cost of a forecast at scale (issue 18)", "",
             f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the start "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores, shared)",
             "- Command: `python benchmarks/forecast_cost.py` (the Llama rows need `pip install transformers`); each "
             f"row with a target runs {repeat} times, one after the other: median (min–max, n); the whole-model "
             "references once. Seconds (wall) of a GPT-2 XL row: the measurement itself (process: with Python's "
             "start and the imports).", "",
             "| case | target | seconds (wall) | CPU s | peak RSS | forecast peak (bytes) | method |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    for compiled in (True, False):
        a, b = measured.get((compiled, True)), measured.get((compiled, False))
        if a is not None and b is not None:
            lines.append("")
            lines.append(f"- {'Compiled' if compiled else 'Eager'} GPT-2 XL: extrapolated {a:,} B against the whole "
                         f"trace {b:,} B ({(a - b) / b:+.4%}).")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
