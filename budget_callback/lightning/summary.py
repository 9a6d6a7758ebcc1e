"""The end-of-fit line: projected vs actual snapshot bytes, the interval, and the run against its forecast (pure)."""

from __future__ import annotations

from ..snapshots.schedule import Schedule
from ..units import format_bytes

PREFIX = "budget-callback summary"


def series_line(schedule: Schedule, figures: dict, who: str = "", parts: list[str] | None = None,
                counted: bool = True, forecast: tuple[int, int] | None = None) -> str:
    """``figures``: bytes_written, files, dropped, lost, missing (rank 0's, on every rank). ``who``: whose figures
    they are, when it needs saying. ``parts``: more to say first (back-pressure). ``counted``: say dropped and
    lost. ``forecast``: (final step, snapshot bytes) of the fit-start forecast, said when the run differed."""
    due, actual, s = schedule.due_bytes(), figures["bytes_written"], schedule
    parts = list(parts or [])
    if counted:
        parts += [f"dropped {figures['dropped']}", f"lost to a full disk {figures['lost']}"]
        parts += [f"removed by something else {figures['missing']}"] if figures.get("missing") else []
    extra = "; " + ", ".join(parts) if parts else ""
    return (f"{PREFIX}{who}: snapshots projected {format_bytes(due)} ({due:,} B) by step {s.last_step}, actual "
            f"{format_bytes(actual)} ({actual:,} B) in {figures['files']} file(s), difference {actual - due:+,} B; "
            f"save_every_n_steps={s.interval}{' (paused)' if s.paused else ''}{extra}"
            f"{against_forecast(s.last_step, forecast)}")


def against_forecast(last_step: int, forecast: tuple[int, int] | None) -> str:
    """How the run's length and bytes compare with the fit-start forecast, when they differ."""
    if forecast is None or last_step == forecast[0]:
        return ""
    final, planned = forecast
    how = "ended early" if last_step < final else "ran past the forecast"
    return (f"; the fit-start forecast counted the run to step {final}, {format_bytes(planned)} ({planned:,} B) of "
            f"snapshots: it {how} at step {last_step}")


def idle_line(idle: dict) -> str:
    """A fit in which no batch ran (resumed from a checkpoint already at the Trainer's limit)."""
    return (f"{PREFIX}: no batch ran in this fit (resumed at step {idle['last_step']}, the Trainer's limit); the "
            f"series holds {format_bytes(idle['bytes_written'])} ({idle['bytes_written']:,} B) in {idle['files']} "
            f"file(s), projected {idle['projected_bytes']:,} B, difference "
            f"{idle['bytes_written'] - idle['projected_bytes']:+,} B")


NOT_STARTED = f"{PREFIX}: no snapshots (the series did not start)"
