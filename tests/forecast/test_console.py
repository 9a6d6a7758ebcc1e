"""The console output W&B captures: records and bytes from what the run prints (pure)."""

import pytest

from budget_callback.forecast.console import ConsoleSpec, console_output_bytes


@pytest.mark.parametrize("steps, refresh, records", [(200, 1, 408), (50, 1, 108), (200, 10, 48), (500, 10, 108)])
def test_one_record_per_write_two_per_bar_update(steps, refresh, records):
    """Measured: a 200-step run with the default bar wrote 408 records = 2 x 200 updates + 8."""
    assert console_output_bytes(steps=steps, refresh_rate=refresh, prog_bar_metrics=1)["records"] == records


def test_the_bar_is_most_of_it_and_settings_that_turn_it_off():
    on = ConsoleSpec().output_bytes(300)
    off = ConsoleSpec(progress_bar=False).output_bytes(300)
    assert on["progress_bar"] > 0.95 * on["total"]
    assert off["progress_bar"] == 0 and off["total"] == off["lightning_lines"] + off["callback_report"]
    assert ConsoleSpec(console="off").output_bytes(300)["total"] == 0
    assert ConsoleSpec(refresh_rate=10).output_bytes(300)["total"] < on["total"] / 5
    wide = ConsoleSpec(terminal_columns=200).output_bytes(300)["total"]
    assert wide > 2 * on["total"]  # a terminal makes every bar line as wide as itself
    assert sum(v for k, v in on.items() if k not in ("total", "records")) == on["total"]


def test_huge_runs_do_not_list_every_step():
    assert console_output_bytes(steps=10**6, prog_bar_metrics=1)["records"] == 2 * 10**6 + 8
    huge = console_output_bytes(steps=10**21, prog_bar_metrics=1)  # answers at once, in floats past 2**53
    assert abs(huge["records"] - 2 * 10**21) / (2 * 10**21) < 1e-9
