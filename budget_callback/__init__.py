"""budget-callback: forecast and guard the budgets of a Lightning run, stream W to safetensors."""

__version__ = "0.1.0"
