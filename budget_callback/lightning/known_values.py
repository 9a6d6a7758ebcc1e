"""Values a traced step can know without the data: answers to data-dependent questions about constants.

Fake tensors have shapes, not values, so a step that asks a question of a tensor's *value* stops the trace:
``nn.Transformer`` checks whether its mask is causal with ``bool((mask == causal).all())``. But that mask is
built from shapes alone (``torch.triu(torch.ones(T, T))``), and its value is known without running the model.

:class:`KnownValues` is a dispatch mode that follows such tensors: a tensor made by a factory op that fills it (``ones``,
``full``, ``arange``, ``zeros_like``, ``tensor(...)``; not ``empty``, whose memory holds anything, nor a random
one), a small buffer of the module (copied, read only), and
whatever is computed from them alone carries a real *value* beside its fake (computed on the CPU with the same
op, only while it is small: :data:`VALUE_LIMIT_BYTES`). A question asked of a tensor with a known value
(``bool``, ``.item()``, ``torch.equal``, ``nonzero`` ...) is answered from it; a tensor written with anything
not known loses its value. A question about the data (the batch, the parameters, activations) still stops the
trace, as it should: its answer is not known before the step runs.

Nothing here draws random numbers or touches a real tensor of the run: values are private copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.weak import WeakTensorKeyDictionary

from .torch_internals import FakeTensor, FakeTensorMode, disable_dispatch_modes

__all__ = ["VALUE_LIMIT_BYTES", "KnownValues"]

VALUE_LIMIT_BYTES = 16 << 20  # a value is kept for tensors up to this size (a 2,048 x 2,048 fp32 mask)

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default}
# ops whose output is known from their arguments' shapes and dtypes alone (``empty`` is not: its memory is
# whatever was there; ``rand`` draws): a tensor argument is only a template
_PRODUCERS = {"ones", "zeros", "full", "arange", "linspace", "logspace", "eye", "scalar_tensor", "lift_fresh",
              "lift_fresh_copy", "new_ones", "new_zeros", "new_full", "ones_like", "zeros_like", "full_like"}


def _small(t: torch.Tensor) -> bool:
    return t.numel() * t.element_size() <= VALUE_LIMIT_BYTES


class KnownValues(TorchDispatchMode):
    """Dispatch mode (push it above the fake mode) that carries real values of constants beside their fakes."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.values = WeakTensorKeyDictionary()
        self.answered = 0  # questions answered from a known value (for the report and the tests)
        self.enabled = True  # off while a compiled region is traced into a graph (its own modes handle it)

    def know(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """``fake`` has the value of ``real`` (a small buffer of the module): a private CPU copy is kept."""
        if real.device.type != "meta" and _small(real) and not isinstance(real, FakeTensor):
            with disable_dispatch_modes(), torch.no_grad():
                self.values[fake] = real.detach().to("cpu", copy=True)

    def _value(self, t: Any) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor):
            return None
        if not isinstance(t, FakeTensor):  # a real constant made outside the mode (``lift_fresh``'s input)
            return t if t.device.type == "cpu" and _small(t) else None
        return self.values.get(t)

    @staticmethod
    def _template(t: torch.Tensor) -> torch.Tensor:
        """A real stand-in for a tensor whose values do not matter (``zeros_like(t)``): its shape and dtype."""
        with disable_dispatch_modes():
            return torch.empty(t.shape if _small(t) else (0,), dtype=t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        known = None
        producer = func.overloadpacket.__name__ in _PRODUCERS
        if producer and func.overloadpacket.__name__ != "lift_fresh" and tensors:  # a template: shape and dtype
            known = [self._template(t) for t in tensors]
        elif (tensors or producer) and torch.Tag.nondeterministic_seeded not in func.tags:
            values = [self._value(t) for t in tensors]
            if all(v is not None for v in values):
                known = values
        if known is None:
            out = func(*args, **kwargs)
            if func._schema.is_mutable:
                self._forget_written(func, args, kwargs)
            return out
        real_flat = list(flat)
        it = iter(known)
        with disable_dispatch_modes():  # a real input (a constant made outside) is copied, never written
            for i, x in enumerate(flat):
                if isinstance(x, torch.Tensor):
                    value = next(it)
                    real_flat[i] = value if isinstance(x, FakeTensor) else value.clone()
        real_args, real_kwargs = tree_unflatten(real_flat, spec)
        if func in _SCALAR_READS or torch.Tag.data_dependent_output in func.tags:
            self.answered += 1
            with disable_dispatch_modes():
                return func(*real_args, **real_kwargs)
        if torch.Tag.dynamic_output_shape in func.tags:  # nonzero, unique, masked_select: shape from the value
            with disable_dispatch_modes():
                real = func(*real_args, **real_kwargs)
            self.answered += 1
            out = tree_map(lambda r: self.fake_mode.from_tensor(r) if isinstance(r, torch.Tensor) else r, real)
            self._attach(out, real)
            return out
        out = func(*args, **kwargs)  # the fake op first: its aliasing and storages are the trace's
        fake_out = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # an in-place op (``_foreach_add_`` of AdamW's steps returns nothing) writes the values it was given
        if (fake_out or func._schema.is_mutable) and all(_small(t) for t in fake_out):
            try:
                with disable_dispatch_modes():
                    real = func(*real_args, **real_kwargs)
            except Exception:  # noqa: BLE001 - a device the CPU cannot make: the value is simply not known
                self._forget(fake_out)
                return out
            self._attach(out, real)
        else:
            self._forget(fake_out)
        return out

    def _attach(self, out: Any, real: Any) -> None:
        for fake, value in zip(tree_leaves(out), tree_leaves(real)):
            if isinstance(fake, FakeTensor) and isinstance(value, torch.Tensor) and _small(value):
                self.values[fake] = value

    def _forget(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, FakeTensor):
                self.values.pop(t, None)

    def _forget_written(self, func, args, kwargs) -> None:  # noqa: ANN001
        """A tensor written with something not known no longer has a known value."""
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                self._forget([t for t in tree_leaves(value) if isinstance(t, torch.Tensor)])
