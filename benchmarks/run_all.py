"""Run every benchmark (one after the other, never in parallel) and assemble BENCHMARKS.md.

    python benchmarks/run_all.py                 # all, ~15 min here, then write BENCHMARKS.md
    python benchmarks/run_all.py streaming scaling   # only these, then reassemble from results/
    python benchmarks/run_all.py --assemble      # only reassemble BENCHMARKS.md from benchmarks/results/*.md

Each script also runs alone and writes benchmarks/results/<name>.md; none is part of pytest.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, log, machine  # noqa: E402

ORDER = ["streaming", "snapshot_io", "reader_scale", "forecast_bytes", "wandb_run_file", "peak_memory", "compiled_memory", "setup_cost", "scaling",
         "gpu_check", "lightning_memory", "forecast_cost"]
PLACEHOLDERS = {  # a section whose script wrote nothing here
    "gpu_check": "## 5. GPU checks\n\nNot measured on GPU yet: this machine has no CUDA device (`python benchmarks/gpu_check.py` "
                 "says so and exits 0). On one, that command runs every check that needs CUDA and writes this "
                 "section; `--quick`, `--part` and `--models` cut it to fit a session.\n",
}

INTRO = """# Benchmarks

How the forecast compares with reality, and what the callback costs. Every figure below was
measured by the scripts in `benchmarks/` on the machine described here; each row names the command
that reproduces it (run from the repository root with the project's environment). Regenerate
everything with `python benchmarks/run_all.py` (about 45 minutes here), or one section with its own
script followed by `python benchmarks/run_all.py --assemble`. Nothing here is part of `pytest`.

Ratios are measured side by side in one run (with and without, alternating), medians over
several runs, spread as min–max. A "**MISS**" is reported as measured, with the reason found;
no benchmark was tuned to pass. GPU rows say "not measured on GPU yet": this machine has none.

## Machine
"""


def assemble() -> Path:
    parts = [INTRO, machine(), ""]
    for name in ORDER:
        path = RESULTS / f"{name}.md"
        parts.append(path.read_text() if path.exists() else
                     PLACEHOLDERS.get(name, f"## {name}\n\nNot run yet: `python benchmarks/{name}.py`.\n"))
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    log(f"wrote {out.relative_to(ROOT)}")
    return out


def main(argv: list[str]) -> int:
    if "--assemble" not in argv:
        names = [a for a in argv if not a.startswith("-")] or ORDER
        for name in names:
            if name not in ORDER:
                raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(ORDER)}")
            log(f"=== {name} ===")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py")], cwd=ROOT, check=True)
            log(f"=== {name} done in {time.perf_counter() - t0:.0f} s ===")
    assemble()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
