"""Size of one Lightning ``.ckpt`` file (``torch.save`` zip archive).

Data: parameters in their stored dtype, plus optimizer state (Adam/AdamW:
``exp_avg``, ``exp_avg_sq`` and a 4-byte ``step`` tensor per parameter).
Overhead: each tensor is a record in the zip (local header + name + padding to
a 64-byte boundary + central directory entry) plus its pickled entry. The
constants below were fitted on checkpoints written by Lightning 2.6 /
torch 2.13 (see ``tests/test_checkpoint.py``, which checks real files, and
BENCHMARKS.md); they matter only for models with many small tensors.
"""

from __future__ import annotations

from .precision import optimizer_states_per_param

CHECKPOINT_FIXED_BYTES = 2_748  # trainer/loop state, callbacks (ours: run id, layout, schedule), zip end records
PARAM_TENSOR_OVERHEAD_BYTES = 325  # per state_dict entry
STATE_TENSOR_OVERHEAD_BYTES = 260  # per optimizer state tensor


def checkpoint_bytes(n_params: int, n_tensors: int, param_bytes: int = 4, optimizer: str = "adamw",
                     momentum: float = 0.0, state_dict_entries: int | None = None) -> int:
    """Bytes of one checkpoint with weights and optimizer state.

    ``n_tensors`` counts distinct parameter tensors; ``state_dict_entries``
    counts state-dict keys (tied weights add a key, not data).
    """
    states = optimizer_states_per_param(optimizer, momentum)
    entries = n_tensors if state_dict_entries is None else state_dict_entries
    data = param_bytes * n_params + states * param_bytes * n_params
    state_tensors = 0
    if optimizer in ("adamw", "adam"):
        state_tensors = 3 * n_tensors  # exp_avg, exp_avg_sq, step
        data += 4 * n_tensors
    elif states:
        state_tensors = n_tensors  # momentum_buffer
    return CHECKPOINT_FIXED_BYTES + data + PARAM_TENSOR_OVERHEAD_BYTES * entries + STATE_TENSOR_OVERHEAD_BYTES * state_tensors
