"""Exceptions raised to the user."""


class BudgetExceededError(RuntimeError):
    """A budget cannot be met under the chosen policy; raised before the first training step."""


class SnapshotWriteError(RuntimeError):
    """The background snapshot writer failed; raised in the training process at the next step."""


class SnapshotDirInUseError(RuntimeError):
    """Another fit holds the lock on ``snapshot_dir``; the message names the holder."""
