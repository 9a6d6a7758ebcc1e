"""The command line: ``budget-callback plan`` (imports neither Lightning nor torch)."""

from .plan import main

__all__ = ["main"]
