"""W&B-specific output: forecast in the run config, a breakdown table, projected-vs-actual charts.

Only used when a ``WandbLogger`` is attached. Every call is best effort: a W&B
problem is reported as a warning and never stops training.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable

from ..forecast.engine import Forecast

CHARTS = {
    "disk": ("budget/disk_chart", "Snapshot bytes on disk: projected vs actual"),
    "memory": ("budget/memory_chart", "Accelerator peak memory: projected vs actual"),
    # wandb-core writes its run file in whole 32 KiB blocks while the run lives: both lines are what is on disk
    "wandb": ("budget/wandb_chart", "W&B run-file bytes on disk (whole 32 KiB blocks): projected vs actual"),
}


def wandb_loggers(loggers: Iterable) -> list:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is a dependency
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _warn(what: str, err: Exception) -> None:
    warnings.warn(f"budget-callback: could not {what} in W&B ({type(err).__name__}: {err}); training goes on",
                  stacklevel=3)


def breakdown_rows(forecast: Forecast) -> list[list]:
    """(section, item, value, unit) rows: every itemised figure of the forecast."""
    rows: list[list] = []
    d = forecast.to_dict()
    for k, v in d["params"].items():
        rows.append(["params", k, int(v), "parameters"])
    for phase, parts in d["memory"]["phases"].items():
        for k, v in parts.items():
            rows.append([f"memory/{phase}", k, int(v), "bytes"])
    for k, v in d["flops"].items():
        if isinstance(v, int):
            rows.append(["flops", k, v, "FLOPs" if k != "tokens_per_step" else "tokens"])
    for k, v in d["storage"].items():
        if isinstance(v, int):
            rows.append(["storage", k, v, "bytes" if k.endswith("bytes") else "count"])
    for k, v in d["wandb"].items():
        rows.append(["wandb", k, int(v), "bytes" if k.endswith("bytes") else "count"])
    return rows


def log_forecast(loggers: list, forecast: Forecast, step: int) -> None:
    """The forecast (itemised, bytes) into the run config and as a ``wandb.Table``."""
    for logger in loggers:
        try:
            logger.experiment.config.update({"budget_forecast": forecast.to_dict()}, allow_val_change=True)
            logger.log_table(key="budget/forecast_table", columns=["section", "item", "value", "unit"],
                             data=breakdown_rows(forecast), step=step)
        except Exception as err:  # noqa: BLE001
            _warn("log the forecast", err)


def run_file_bytes(logger) -> int | None:
    """Bytes of the local ``run-*.wandb`` file of the logger's run (the W&B usage actually written)."""
    try:
        run_dir = os.path.dirname(logger.experiment.dir)
        files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        return os.path.getsize(files[0]) if files else None
    except Exception:  # noqa: BLE001
        return None


def log_charts(loggers: list, series: dict[str, list], step: int) -> None:
    """One panel per budget with projected and actual as two lines over trainer/global_step."""
    if not loggers or not series.get("step"):
        return
    import wandb

    for logger in loggers:
        try:
            charts = {}
            for name, (key, title) in CHARTS.items():
                projected, actual = series.get(f"{name}_projected"), series.get(f"{name}_actual")
                if not projected or not actual or len(projected) != len(series["step"]):
                    continue
                charts[key] = wandb.plot.line_series(xs=list(series["step"]), ys=[list(projected), list(actual)],
                                                     keys=["projected", "actual"], title=title,
                                                     xname="trainer/global_step")
            if charts:
                logger.log_metrics(charts, step=step)
        except Exception as err:  # noqa: BLE001
            _warn("log the projected-vs-actual charts", err)


def log_events(loggers: list, events: list[dict], step: int) -> None:
    """Events (interval raised, disk guard, cleaned temporaries) as a table a user can find in the run."""
    if not loggers or not events:
        return
    columns = ["step", "event", "detail"]
    data = [[int(e.get("step", 0)), str(e.get("event")),
             ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("step", "event"))] for e in events]
    for logger in loggers:
        try:
            logger.log_table(key="budget/events_table", columns=columns, data=data, step=step)
        except Exception as err:  # noqa: BLE001
            _warn("log the events", err)


def log_summary_line(loggers: list, line: str) -> None:
    """The end-of-fit projected-vs-actual line, in the run summary (``budget/summary``)."""
    for logger in loggers:
        try:
            logger.experiment.summary["budget/summary"] = line
        except Exception as err:  # noqa: BLE001
            _warn("write the summary line", err)
