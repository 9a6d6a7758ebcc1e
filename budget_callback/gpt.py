"""Old import path, kept working: the reference transformer lives in :mod:`budget_callback.models.gpt`."""

from .models.gpt import GPT, MLP, Attention, Block  # noqa: F401
