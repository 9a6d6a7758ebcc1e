"""The user's module, made fake in place for one trace, and everything put back and checked afterwards.

The fit-start trace must change nothing and hold nothing outside its own fakes. Copying the module
(``copy.deepcopy``) copies what is not a tensor too: a ``np.memmap`` dataset (hundreds of MB of RSS), a lock or an
open file (``cannot pickle``), and a ``training_step`` wrapped on the instance still calls the *real* module. So
the module is not copied: :class:`FakeModule` swaps every tensor it holds (parameters, buffers, tensors kept as
attributes, in lists, tuples and dicts) for a fake one *in place*, the way ``torch.func.functional_call``
reparametrizes, and on exit puts back every module's attributes as they were. Any code path that reaches the
module (a wrapper on the instance, a bound method stored elsewhere, a hook) then sees fake tensors.

While the trace runs:

* Python's ``random``, NumPy's global generator and torch's generators (CPU and every initialised CUDA device) are
  saved, and restored afterwards: training is bit-identical with and without the trace.
* Lightning's side effects are disabled on the instance: ``log``/``log_dict`` do nothing, ``optimizers()`` gives
  the rebuilt fake optimizers, ``manual_backward`` is ``backward``, toggling does nothing.
* Containers held as attributes (lists, dicts, sets) are shallow copies, so a step that appends to one leaves the
  original alone.
* FSDP2's forward hooks (which gather parameters with collectives) are set aside: the step is traced unsharded,
  each DTensor at its global shape, and :mod:`.sharding` gives each device's share.

On exit, the proof (:meth:`FakeModule.verify`): every real parameter and buffer is back under its name, with the
same version counter and the same gradient; anything else raises :class:`TraceNotHermetic`, and the trace's
figures are discarded. The tracker (:mod:`.tracing`) also refuses, before it runs, any op that would write a real
tensor.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from .torch_internals import FakeTensorMode, is_fsdp2_hook

__all__ = ["FakeModule", "TraceNotHermetic", "fake_like", "rng_states", "set_rng_states"]


class TraceNotHermetic(RuntimeError):
    """The traced step reached something real (a tensor written, an attribute left changed): trace discarded."""


def fake_like(fake_mode: FakeTensorMode, t: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A fake tensor on ``device`` with the size, stride and dtype of ``t`` (any device, ``meta`` included; a
    DTensor at its global shape: the step is traced unsharded, :mod:`.sharding` gives each device's share)."""
    with fake_mode:
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    return out.requires_grad_(t.requires_grad)


def rng_states() -> dict[str, Any]:
    """Every global random state a training step can draw from."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        states["mps"] = mps.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` saved."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states:
        torch.mps.set_rng_state(states["mps"])


_CONTAINERS = (list, tuple, dict)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_leaves(value))


class _Noop:
    """A do-nothing stand-in for a LightningModule method (``self.log`` and friends)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class FakeModule:
    """``with FakeModule(module, fake_mode) as fake:`` -- ``module`` itself, its tensors fake, for one trace.

    ``fake.memo`` maps ``id(real tensor)`` to its fake (tied tensors stay tied); ``fake.optimizers`` (set by the
    caller) is what ``module.optimizers()`` returns meanwhile. On exit every module's attributes, parameters,
    buffers and children are put back as they were, and every random generator as it was; then
    :meth:`verify` checks that nothing real changed (raises :class:`TraceNotHermetic`, unless the block
    raised already).
    """

    def __init__(self, module: nn.Module, fake_mode: FakeTensorMode, device: str = "cpu") -> None:
        self.module, self.fake_mode, self.device = module, fake_mode, device
        self.memo: dict[int, torch.Tensor] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self._saved: list[tuple[nn.Module, dict, dict, dict, dict]] = []
        self._real: list[tuple[str, torch.Tensor, int, torch.Tensor | None, int | None]] = []
        self._rng: dict[str, Any] = {}

    # --- entering: swap -----------------------------------------------------------------------------------------
    def fake(self, t: torch.Tensor) -> torch.Tensor:
        """The fake counterpart of a real tensor (made once, so tied tensors stay tied)."""
        found = self.memo.get(id(t))
        if found is None:
            found = fake_like(self.fake_mode, t.detach() if isinstance(t, nn.Parameter) else t, self.device)
            if isinstance(t, nn.Parameter):
                found = nn.Parameter(found, requires_grad=t.requires_grad)
            self.memo[id(t)] = found
        return found

    def __enter__(self) -> FakeModule:
        self._rng = rng_states()
        modules = list(self.module.modules())
        for mod in modules:
            self._saved.append((mod, dict(mod.__dict__), dict(mod._parameters), dict(mod._buffers),
                                dict(mod._modules)))
        for name, t in [*self.module.named_parameters(remove_duplicate=True),
                        *self.module.named_buffers(remove_duplicate=True)]:
            grad = t.grad if isinstance(t, nn.Parameter) else None
            self._real.append((name, t, t._version, grad, grad._version if grad is not None else None))
        try:
            for mod in modules:
                self._swap(mod)
        except BaseException:
            self._restore()
            raise
        return self

    def _swap(self, mod: nn.Module) -> None:
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = self.fake(p)
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = self.fake(b)
        for name in ("_forward_pre_hooks", "_forward_hooks"):  # FSDP2 gathers with collectives: set aside
            hooks = mod.__dict__.get(name)
            if hooks and any(is_fsdp2_hook(h) for h in hooks.values()):
                mod.__dict__[name] = type(hooks)((k, h) for k, h in hooks.items() if not is_fsdp2_hook(h))
        for name, value in list(mod.__dict__.items()):
            if name in ("_parameters", "_buffers", "_modules") or name.startswith("_forward") \
                    or name.startswith("_backward") or name.startswith("_state_dict") \
                    or name.startswith("_load_state_dict"):
                continue
            if isinstance(value, torch.Tensor):
                mod.__dict__[name] = self.fake(value)
            elif isinstance(value, _CONTAINERS) and _has_tensor(value):
                mod.__dict__[name] = tree_map_only(torch.Tensor, self.fake, value)
            elif type(value) in (list, dict, set):  # appends in the step go to a copy
                mod.__dict__[name] = type(value)(value)
        if hasattr(mod, "log_dict") and hasattr(mod, "manual_backward"):  # a LightningModule
            self._stub_lightning(mod)

    def _stub_lightning(self, mod: nn.Module) -> None:
        noop = _Noop()
        opts = self.optimizers
        mod.__dict__.update({
            "log": noop, "log_dict": noop, "toggle_optimizer": noop, "untoggle_optimizer": noop,
            "optimizers": lambda use_pl_optimizer=True: opts[0] if len(opts) == 1 else list(opts),
            "lr_schedulers": lambda: None,
            "manual_backward": lambda loss, *args, **kwargs: loss.backward(*args, **kwargs),
        })

    def real_buffers(self) -> list[torch.Tensor]:
        """The module's real buffers (while it is fake)."""
        return [t for _, t, *_ in self._real if not isinstance(t, nn.Parameter) and id(t) in self.memo]

    # --- leaving: restore, then prove -------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        self._restore()
        if exc_type is None:
            self.verify()

    def _restore(self) -> None:
        for mod, attrs, params, buffers, children in reversed(self._saved):
            mod.__dict__.clear()
            mod.__dict__.update(attrs)
            for owned, saved in ((mod._parameters, params), (mod._buffers, buffers), (mod._modules, children)):
                owned.clear()
                owned.update(saved)
        if self._rng:
            set_rng_states(self._rng)

    def verify(self) -> None:
        """Every real parameter and buffer back under its name, unchanged (version counter), its gradient too."""
        now = dict([*self.module.named_parameters(remove_duplicate=True),
                    *self.module.named_buffers(remove_duplicate=True)])
        for name, t, version, grad, grad_version in self._real:
            if now.get(name) is not t:
                raise TraceNotHermetic(f"after the trace, {name} is not the module's own tensor")
            if t._version != version:
                raise TraceNotHermetic(f"the traced step wrote the real {name} (version {version} -> {t._version})")
            if isinstance(t, nn.Parameter) and (t.grad is not grad or
                                                (grad is not None and grad._version != grad_version)):
                raise TraceNotHermetic(f"the traced step changed the real gradient of {name}")
