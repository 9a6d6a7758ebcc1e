"""Pure forecast math: plain values in, itemised integer results out. Imports neither Lightning nor torch."""

from .engine import DEFAULT_MFU, Budgets, Forecast, Measured, PlanInputs, SnapshotSpec, forecast
from .memory import TrainSetup
from .shapes import PRESETS, ModelShape, preset
from .wandb_usage import LoggingSpec

__all__ = ["DEFAULT_MFU", "Budgets", "Forecast", "LoggingSpec", "Measured", "ModelShape", "PRESETS", "PlanInputs",
           "SnapshotSpec", "TrainSetup", "forecast", "preset"]
