"""Benchmark 2c: W&B local run-file bytes, forecast vs the offline run's run-*.wandb.

A real Trainer run (TinyGPT-like ShapeLM logging train/loss, BudgetCallback attached) with
WandbLogger(offline=True) under WANDB_MODE=offline; after wandb.finish() the size of the
offline run directory's run-*.wandb is compared with the forecast
(cb.forecast.wandb["run_file_bytes"], i.e. budget_callback.forecast.wandb_usage.wandb_usage). Target: 20%.

    python benchmarks/wandb_run_file.py      # ~2 min here
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, median, spread, table, tmp_dir, verdict, write_section  # noqa: E402
from models import ShapeLM, token_loader, trainer  # noqa: E402

from budget_callback import BudgetCallback  # noqa: E402
from budget_callback.forecast.shapes import ModelShape  # noqa: E402

warnings.filterwarnings("ignore")
LAST_METRICS: dict = {}
SHAPE = ModelShape(vocab_size=1_000, d_model=32, n_layer=1, n_head=2, n_ctx=16, name="wandb-bench")


def one_run(steps: int, log_every: int, tag: str) -> tuple[int, int, dict]:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    root = tmp_dir("wandb_run_file") / tag
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    logger = WandbLogger(project="budget-callback-bench", save_dir=str(root), offline=True)
    cb = BudgetCallback(root / "snapshots", save_every_n_steps=max(1, steps // 20), verbose=False)
    t = trainer(root, [cb], steps, logger=logger, log_every_n_steps=log_every)
    t.fit(ShapeLM(SHAPE), token_loader(SHAPE.vocab_size, SHAPE.n_ctx, 4 * steps, 4))
    wandb.finish()
    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    LAST_METRICS.clear()
    LAST_METRICS.update(cb._metrics(t, steps))  # the keys the callback logs per row (same code path as _log)
    return cb.forecast.wandb["run_file_bytes"], os.path.getsize(files[0]), cb.forecast.wandb


def main() -> int:
    cases = [(100, 1), (500, 10), (1000, 50), (1000, 5)]
    reps = 2
    rows, fit_x, fit_y = [], [], []
    for steps, every in cases:
        actual, forecast, info = [], None, None
        for r in range(reps):
            forecast, size, info = one_run(steps, every, f"s{steps}-e{every}-r{r}")
            actual.append(size)
            log(f"steps {steps}, log_every_n_steps {every}, rep {r + 1}: forecast {forecast:,} B, run file {size:,} B")
        m = median(actual)
        fit_x.append(info["rows"])
        fit_y.append(m)
        err = (forecast - m) / m
        rows.append([f"{steps} steps, log_every_n_steps={every} ({info['rows']} rows, {info['metric_points']} points "
                     "forecast)", f"{forecast:,}", f"{m:,.0f}", spread(actual, "{:,.0f}"), f"{err * 100:+.1f}%",
                     "within 20%", verdict(abs(err) <= 0.20), "`python benchmarks/wandb_run_file.py`"])
    misses = [r for r in rows if "MISS" in r[6]]
    import statistics

    from budget_callback.forecast import wandb_usage as WU

    line = statistics.linear_regression(fit_x, fit_y)
    scalars = 2 + WU.CALLBACK_METRICS  # train/loss, epoch and the callback's own budget/* scalars
    per_row_forecast = WU.RUN_FILE_BYTES_PER_ROW + scalars * WU.RUN_FILE_BYTES_PER_POINT
    keys = sorted({k for k in LAST_METRICS if k.startswith("budget/")} | {"budget/events"})  # _log adds events
    extra = (len(keys) - WU.CALLBACK_METRICS) * WU.RUN_FILE_BYTES_PER_POINT
    md = "\n".join([
        "## 2c. W&B local run-file bytes: forecast vs offline run-*.wandb",
        "",
        f"ShapeLM (V={SHAPE.vocab_size:,}, D={SHAPE.d_model}, 1 layer) logging `train/loss` through "
        "`WandbLogger(offline=True)` (`WANDB_MODE=offline`) with BudgetCallback attached (which also logs its "
        "`budget/*` scalars, the forecast config/table and the end-of-fit charts); size of "
        "`wandb/offline-run-*/run-*.wandb` after `wandb.finish()`. Forecast `cb.forecast.wandb['run_file_bytes']`. "
        f"{reps} runs per row (median, min–max).",
        "",
        table(["run", "forecast B", "run file B (median)", "spread", "error", "target", "result", "command"], rows),
    ])
    md += (f"\n\nLeast-squares fit of the measured size on the number of logged rows: **{line.slope:,.0f} B per row "
           f"+ {line.intercept:,.0f} B fixed**; the forecast assumes {per_row_forecast:,} B per row "
           f"({WU.RUN_FILE_BYTES_PER_ROW} B + {scalars} scalars x {WU.RUN_FILE_BYTES_PER_POINT} B: train/loss, "
           f"epoch and {WU.CALLBACK_METRICS} `budget/*` scalars ({len(keys)} logged here)) + "
           f"{WU.RUN_FILE_FIXED_BYTES:,} B fixed.")
    if misses:
        md += ("\n\n**Target missed** in " + str(len(misses)) + " of " + str(len(rows)) + " rows: the forecast is too "
               f"low. Reason found: (1) per row, the callback logs {len(keys)} `budget/*` scalars "
               f"({', '.join('`' + k + '`' for k in keys)}) against {WU.CALLBACK_METRICS} forecast "
               f"({extra:+,} B per row); (2) the per-row gap is {line.slope - per_row_forecast:,.0f} B and the fixed "
               f"part {line.intercept - WU.RUN_FILE_FIXED_BYTES:+,.0f} B.")
    write_section("wandb_run_file", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
