"""Old import path, kept working: shapes and presets live in :mod:`budget_callback.forecast.shapes`."""

from .forecast.shapes import MLPS, NORMS, PRESETS, PUBLISHED_PARAMS, ModelShape, preset  # noqa: F401
