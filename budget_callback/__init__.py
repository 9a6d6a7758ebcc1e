"""budget-callback: forecast and guard the budgets of a Lightning run, stream W to safetensors."""

from .callback import BudgetCallback
from .errors import BudgetExceededError, SnapshotWriteError
from .reader import SnapshotReader

__all__ = ["BudgetCallback", "BudgetExceededError", "SnapshotReader", "SnapshotWriteError"]
__version__ = "0.1.0"
