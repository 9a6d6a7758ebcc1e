"""The real peak of one training step, measured inside a real ``Trainer.fit`` the way Lightning runs it.

Independent of the tracer: torch.profiler's memory events report every allocation and free through c10's CPU
allocator (inductor's buffers included, which no dispatch mode sees). The peak of batch ``batch_index`` (a
steady-state step: the previous step's gradients and the optimizer state exist) is what is alive as it starts
plus the largest rise of the running sum of the events within it. List the probe *before* other callbacks so the window is the
step itself: Lightning's closure (``training_step``, ``zero_grad``, backward), clipping, the optimizer's update.
(benchmarks/lightning_memory.py carries a copy: benchmarks do not import tests.)
"""

from __future__ import annotations

import gc

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._pytree import tree_leaves


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the tensors in a pytree (DTensors: their local shards)."""
    seen = {}
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            if hasattr(t, "to_local"):
                t = t.to_local()
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


class StepPeakProbe(L.Callback):
    """``probe.peak_bytes``: the peak live tensor bytes of the training step on batch ``batch_index``.

    The profiler runs from the first batch on: it does not report the release of a block allocated before it
    started (the previous step's gradients, freed by ``zero_grad``), so every block a step frees must have been
    allocated inside the window. The step's window is marked with ``record_function``; its peak is what is alive
    as it starts (parameters, buffers, tensors the modules keep as attributes, gradients, optimizer state, the
    batch) plus the largest rise of the
    running sum of the events within it. What other code keeps alive across steps (a callback's host buffers,
    the data fetcher's next batch) is not the step's.
    """

    def __init__(self, batch_index: int = 2) -> None:
        self.batch_index = batch_index
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self._prof = None
        self._marks: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        if batch_idx == self.batch_index and self._prof is not None:
            gc.collect()
            params = list(pl_module.parameters())
            held = [v for m in pl_module.modules() for k, v in vars(m).items()
                    if k not in ("_parameters", "_buffers", "_modules")]  # tensors kept as attributes (caches)
            self.start_bytes = storage_bytes((params, list(pl_module.buffers()), [p.grad for p in params],
                                              [list(o.state.values()) for o in trainer.optimizers], batch,
                                              [h for h in held if isinstance(h, (torch.Tensor, list, tuple, dict))]))
            with record_function("step_probe/start"):
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != self.batch_index or self._prof is None:
            return
        with record_function("step_probe/end"):
            pass
        self._prof.__exit__(None, None, None)
        events = list(self._prof.profiler.kineto_results.events())
        marks = {e.name(): e.start_ns() for e in events if e.name().startswith("step_probe/")}
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        running, at_start, peak = 0, None, 0
        for t, n in memory:
            if t >= marks["step_probe/start"] and at_start is None:
                at_start = running
            running += n
            if marks["step_probe/start"] <= t <= marks["step_probe/end"]:
                peak = max(peak, running - at_start)
        self.peak_bytes = self.start_bytes + peak
        self._prof = None


def real_step_peak(module: L.LightningModule, loader, batch_index: int = 2, callbacks=(), **trainer_kwargs) -> int:
    """Fit ``module`` for ``batch_index + 1`` batches on the CPU and return the peak of batch ``batch_index``."""
    probe = StepPeakProbe(batch_index)
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    options = dict(max_steps=(batch_index + accumulate) // accumulate, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(trainer_kwargs)
    L.Trainer(callbacks=[probe, *callbacks], **options).fit(module, loader)
    assert probe.peak_bytes is not None, "the probed batch did not run"
    return probe.peak_bytes
