"""Benchmark 2c: W&B local run-file bytes, forecast vs the offline run's run-*.wandb.

A real Trainer run (a small GPT logging train/loss with ``prog_bar=True``, BudgetCallback attached) with
WandbLogger(offline=True) under WANDB_MODE=offline; after wandb.finish() the size of the offline run
directory's run-*.wandb is compared with the forecast (cb.forecast.wandb["run_file_bytes"]:
budget_callback.forecast.wandb_usage, the console part from budget_callback.forecast.console). W&B
captures the console by default, so every case runs with Lightning's default progress bar, with the bar
disabled, and with W&B's console capture off. Each run is its own process (a fresh W&B console patch),
stdout a pipe. Target: within 20% on the wandb the model was fitted on, within 25% on any other.

The model (``forecast/console.py``, ``forecast/wandb_usage.py``) was fitted on wandb 0.31, Lightning 2.6.6 and
tqdm 4.70.1; running this script in another environment (the oldest declared pins, say) adds that
environment's table to the section, one table per wandb version:

    python benchmarks/wandb_run_file.py                  # ~6 min here
    .venv-oldest/bin/python benchmarks/wandb_run_file.py # the oldest pins: python3 -m venv .venv-oldest &&
                                                         #   .venv-oldest/bin/pip install -r .ci/oldest.txt -e .
    python benchmarks/wandb_run_file.py --quick          # the three 200-step cases, one run each
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, log, median, spread, table, tmp_dir, verdict, write_section  # noqa: E402

VERSIONS = RESULTS / "wandb_run_file"  # one table per wandb version measured


def _version_key(path: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in path.stem.split("-", 1)[1].split("."))


def torch_version() -> str:
    import torch

    return torch.__version__

SHAPE = dict(vocab_size=1_000, d_model=32, n_layer=1, n_head=2, n_ctx=16, name="wandb-bench")
CASES = [  # (steps, log_every_n_steps, progress bar, W&B console)
    (200, 10, True, "auto"), (200, 10, False, "auto"), (200, 10, True, "off"),
    (500, 10, True, "auto"), (500, 10, False, "auto"),
    (1000, 50, True, "auto"), (1000, 50, False, "auto"), (1000, 5, True, "auto"),
]


def one_run(steps: int, log_every: int, bar: bool, console: str, root: Path) -> dict:
    """In a fresh process: one fit, then the forecast and the run file's size."""
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_CONSOLE=console)
    warnings.filterwarnings("ignore")
    import lightning as L
    import torch
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from budget_callback import BudgetCallback
    from budget_callback.forecast.shapes import ModelShape
    from models import ShapeLM, token_loader

    class BarLM(ShapeLM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.model(x, y)[1]
            self.log("train/loss", loss, prog_bar=True)
            return loss

    shape = ModelShape(**SHAPE)
    logger = WandbLogger(project="budget-callback-bench", save_dir=str(root), offline=True)
    cb = BudgetCallback(root / "snapshots", save_every_n_steps=max(1, steps // 20), verbose=False)
    torch.manual_seed(0)
    t = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=[cb],
                  enable_checkpointing=False, enable_progress_bar=bar, enable_model_summary=False,
                  default_root_dir=str(root), log_every_n_steps=log_every)
    t.fit(BarLM(shape), token_loader(shape.vocab_size, shape.n_ctx, 4 * steps, 4))
    wandb.finish()
    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    return {"forecast": cb.forecast.wandb, "size": os.path.getsize(files[0])}


QUICK_CASES = CASES[:3]  # 200 steps: the progress bar, none, and W&B's console capture off


def run_case(steps: int, log_every: int, bar: bool, console: str, rep: int) -> dict:
    root = tmp_dir("wandb_run_file") / f"s{steps}-e{log_every}-{'bar' if bar else 'nobar'}-{console}-r{rep}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    args = json.dumps([steps, log_every, bar, console, str(root)])
    proc = subprocess.run([sys.executable, __file__, "--one", args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


FITTED_ON = "0.31.0"  # the wandb whose run files the model's constants come from


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        steps, every, bar, console, root = json.loads(sys.argv[2])
        print(json.dumps(one_run(steps, every, bar, console, Path(root))))
        return 0
    import lightning
    import tqdm
    import wandb

    target = 0.20 if wandb.__version__ == FITTED_ON else 0.25
    quick = "--quick" in sys.argv
    reps, cases = (1, QUICK_CASES) if quick else (2, CASES)
    rows = []
    for steps, every, bar, console in cases:
        sizes, info = [], None
        for r in range(reps):
            got = run_case(steps, every, bar, console, r)
            info, size = got["forecast"], got["size"]
            sizes.append(size)
            log(f"{steps} steps, log every {every}, bar {bar}, console {console}, rep {r + 1}: "
                f"forecast {info['run_file_bytes']:,} B (console {info['console_bytes']:,}), run file {size:,} B")
        m = median(sizes)
        err = (info["run_file_bytes"] - m) / m
        what = (f"{steps} steps, log_every_n_steps={every}, progress bar {'default' if bar else 'disabled'}"
                f"{', WANDB_CONSOLE=off' if console == 'off' else ''}")
        rows.append([what, f"{info['run_file_bytes']:,}", f"{info['console_bytes']:,}", f"{m:,.0f}",
                     spread(sizes, "{:,.0f}"), f"{err * 100:+.1f}%", f"within {target:.0%}",
                     verdict(abs(err) <= target),
                     f"`{os.path.relpath(sys.executable, ROOT)} benchmarks/wandb_run_file.py{' --quick' if quick else ''}`"])
    versions = f"wandb {wandb.__version__}, Lightning {lightning.__version__}, tqdm {tqdm.__version__}"
    table_md = "\n".join([
        f"### {versions}" + (" (the versions the model was fitted on)" if wandb.__version__ == FITTED_ON else "")
        + (f" (`--quick`: {len(cases)} cases, {reps} run each)" if quick else ""),
        "",
        table(["run", "forecast B", "of which console B", "run file B (median)", "spread", "error", "target",
               "result", "command"], rows),
        "",
        f"_Measured {time.strftime('%Y-%m-%d %H:%M:%S %Z')} with {versions}, torch {torch_version()}._",
    ])
    VERSIONS.mkdir(parents=True, exist_ok=True)
    (VERSIONS / f"wandb-{wandb.__version__}.md").write_text(table_md + "\n")
    tables = [f.read_text().rstrip() for f in sorted(VERSIONS.glob("wandb-*.md"), key=_version_key)]
    md = "\n".join([
        "## 2c. W&B local run-file bytes: forecast vs offline run-*.wandb",
        "",
        f"A GPT (V={SHAPE['vocab_size']:,}, D={SHAPE['d_model']}, 1 layer) logging `train/loss` with "
        "`prog_bar=True` through `WandbLogger(offline=True)` (`WANDB_MODE=offline`) with BudgetCallback attached "
        "(its `budget/*` scalars, the forecast config and table, the end-of-fit charts); each run in a fresh "
        "process with stdout a pipe; size of `wandb/offline-run-*/run-*.wandb` after `wandb.finish()`. Forecast "
        "`cb.forecast.wandb['run_file_bytes']` (its console part shown alone). W&B captures the console by "
        f"default: the progress bar is most of a run file. {reps} runs per row (median, min–max). The model's "
        f"constants were fitted on wandb {FITTED_ON} (target: within 20% there, within 25% on other versions); one "
        "table per wandb version measured, oldest first.",
        "",
        "\n\n".join(tables),
    ])
    write_section("wandb_run_file", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
