"""One optimizer step in the order Lightning runs it, for the traced (fake) step.

Lightning's automatic optimization (``loops/optimization/automatic.py``) hands the optimizer a closure that runs
``training_step``, then ``zero_grad`` (the module's ``optimizer_zero_grad`` hook, ``set_to_none=True`` by
default, only on the first micro-batch of an accumulation window), then backward; the optimizer's update follows.
So the previous step's gradients are alive through the whole forward, and while accumulating through every
later micro-batch's forward and backward too. A step traced in any other order forgets them.

Under manual optimization ``training_step`` does everything itself (``zero_grad`` wherever the user put it), so
two steps are run and the second is measured: it starts with whatever the first left alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["StepOrder", "loss_tensor", "run_step"]


def _default_zero_grad(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()


@dataclass(frozen=True)
class StepOrder:
    """How the trainer runs one optimizer step.

    ``zero_grad(module, optimizer)`` is called where Lightning calls ``optimizer_zero_grad`` (the module's own hook
    under a Trainer, so an override with ``set_to_none=False`` is honoured). ``grad_accum`` > 1 runs two
    micro-batches (the second stands for every later one of the window). ``clip_gradients``: Lightning's gradient
    clipping (``gradient_clip_val``) by ``"norm"`` or ``"value"``, with its value.
    """

    manual: bool = False
    grad_accum: int = 1
    zero_grad: Callable[[nn.Module, torch.optim.Optimizer], None] = _default_zero_grad
    clip_gradients: tuple[str, float] | None = None

    @classmethod
    def of_lightning(cls, trainer: Any, module: nn.Module) -> StepOrder:
        """The order ``trainer`` runs ``module``'s steps in (its accumulation, its hooks, its clipping)."""
        clip = getattr(trainer, "gradient_clip_val", None)
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        hook = getattr(type(module), "optimizer_zero_grad", None)

        def zero_grad(m: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            if hook is None:
                optimizer.zero_grad()
            else:
                m.optimizer_zero_grad(getattr(trainer, "current_epoch", 0), 0, optimizer)
        return cls(manual=not getattr(module, "automatic_optimization", True),
                   grad_accum=max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)), zero_grad=zero_grad,
                   clip_gradients=(str(algorithm).split(".")[-1].lower(), float(clip)) if clip else None)


def loss_tensor(out: Any) -> torch.Tensor:
    """The loss a ``training_step`` returned (a tensor, or a dict with ``"loss"``)."""
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the training step must return a tensor or a dict with a 'loss' tensor, got "
                        f"{type(out).__name__}")
    return out


def _clip(params: list[torch.Tensor], how: tuple[str, float]) -> None:
    grads = [p for p in params if p.grad is not None]
    if how[0] == "value":
        torch.nn.utils.clip_grad_value_(grads, how[1])
    else:
        torch.nn.utils.clip_grad_norm_(grads, how[1])


def run_step(module: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any],
             optimizers: list[torch.optim.Optimizer], order: StepOrder, autocast_dtype: torch.dtype | None = None,
             phase: Callable[[str], None] = lambda name: None, before_backward: Callable[[Any], None] | None = None,
             device_type: str = "cpu") -> None:
    """One optimizer step of ``module`` on ``batch`` in ``order``, each phase announced with ``phase(name)``:
    ``forward`` (the training step, the previous step's gradients alive), ``backward`` (after ``zero_grad``),
    with accumulation ``accumulate_forward`` / ``accumulate_backward`` (gradients alive), then ``optimizer``.
    Under manual optimization the whole step is ``forward``."""
    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    if order.manual:
        phase("forward")
        with autocast():
            out = loss_fn(module, batch)
        del out
        return
    for micro in range(min(order.grad_accum, 2)):
        phase("forward" if micro == 0 else "accumulate_forward")
        with autocast():
            out = loss_fn(module, batch)
        loss = loss_tensor(out)
        if order.grad_accum > 1:
            loss = loss / order.grad_accum  # Lightning's closure normalises the loss
        del out
        if micro == 0:
            for optimizer in optimizers:
                order.zero_grad(module, optimizer)
        if before_backward is not None:
            before_backward(loss)
        phase("backward" if micro == 0 else "accumulate_backward")
        loss.backward()
        del loss
    phase("optimizer")
    if order.clip_gradients is not None:
        _clip([p for o in optimizers for g in o.param_groups for p in g["params"]], order.clip_gradients)
    for optimizer in optimizers:
        optimizer.step()
