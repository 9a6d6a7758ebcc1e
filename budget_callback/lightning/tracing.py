"""Estimate the peak memory of one training step by tracing it with fake tensors.

The step (forward, loss, backward, optimizer step) runs on a *fake* copy of the
module under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`: every op
computes only shapes, dtypes and strides, so no parameter, activation or
optimizer state is ever allocated. A small :class:`TorchDispatchMode` watches
the storages that the ops create and free (through weak references, the same
way ``torch.distributed._tools.mem_tracker.MemTracker`` does) and records the
largest number of live bytes.

The result is *tensor* memory, as a caching allocator would be asked for it; it
does not include the CUDA context, allocator rounding/fragmentation, cuBLAS or
NCCL workspaces.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_leaves, tree_map_only

__all__ = ["rebuild_optimizer", "resize_batch", "trace_training_step_memory"]

_PHASES = ("forward", "backward", "optimizer")


class _LiveStorageTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages and remember the peak.

    Storages created by dispatched ops are tracked automatically; tensors that
    already exist (parameters, batch, optimizer state) are registered with
    :meth:`track`. A storage stops counting when its Python object is
    finalised, which for storages means the memory itself is released.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, str] = {}  # storage -> name: in-place writes outside an optimizer step are noted
        self.written: set[str] = set()
        self.in_optimizer = 0
        self._refs: dict[int, weakref.ref] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peak_bytes: dict[str, int] = {}
        self.phase_start_bytes: dict[str, int] = {}  # live bytes when each phase began

    def track(self, tensors: Any) -> None:
        """Start counting the storages of every tensor in the pytree ``tensors``."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())

    def set_phase(self, phase: str) -> None:
        """Label subsequent allocations (``forward``, ``backward``, ...)."""
        self.phase = phase
        self.phase_peak_bytes[phase] = self.current_bytes
        self.phase_start_bytes[phase] = self.current_bytes

    def reset_peak(self) -> None:
        """Forget the peak so far; the next peak starts from the current bytes."""
        self.peak_bytes = self.current_bytes
        self.peak_phase = self.phase
        self.phase_peak_bytes = {}
        self.phase_start_bytes = {}

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, functools.partial(self._release, key, nbytes))
        self.current_bytes += nbytes
        if self.current_bytes > self.phase_peak_bytes.get(self.phase, 0):
            self.phase_peak_bytes[self.phase] = self.current_bytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_phase = self.phase

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        del self._refs[key]
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.watched and not self.in_optimizer and func._schema.is_mutable:
            self._note_writes(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out

    def _note_writes(self, func, args, kwargs) -> None:  # noqa: ANN001
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    name = self.watched.get(t.untyped_storage()._cdata)
                    if name is not None:
                        self.written.add(name)


def _storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind the tensors in the pytree ``tensors``."""
    seen: dict[int, int] = {}
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[id(st)] = st.nbytes()
    return sum(seen.values())


def _fake_like(fake_mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A fake CPU tensor with the size, stride and dtype of ``t`` (any device)."""
    with fake_mode:
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu")
    return out.requires_grad_(t.requires_grad)


def _fake_module(module: nn.Module, fake_mode: FakeTensorMode, skip: tuple = ()) -> tuple[nn.Module, dict]:
    """Deep-copy ``module`` with every parameter, buffer and tensor attribute made fake, to run eagerly.

    Works for modules on any device, ``meta`` included. Returns the copy and the
    memo (``id(real tensor) -> fake tensor``, see :func:`_fake_memo`).
    """
    memo = _fake_memo(module, fake_mode, skip)
    with fake_mode:
        fake = copy.deepcopy(module, memo)
    return _run_eagerly_on_itself(fake, memo), memo


def _fake_memo(module: nn.Module, fake_mode: FakeTensorMode, skip: tuple = ()) -> dict[int, Any]:
    """A deepcopy memo pre-filled with a fake counterpart of every tensor ``module`` holds.

    No real tensor is then copied (``Tensor.__deepcopy__`` would copy real storages)
    and tied weights stay tied; the objects in ``skip`` become None in the copy.
    """
    memo: dict[int, Any] = {id(obj): None for obj in skip}  # left out of the copy (e.g. the Trainer)
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(_fake_like(fake_mode, p.detach()), requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = _fake_like(fake_mode, b)
    for mod in module.modules():
        for name, value in vars(mod).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor) and id(t) not in memo:
                    memo[id(t)] = _fake_like(fake_mode, t)
    return memo


_STEP_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _run_eagerly_on_itself(fake: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Make the copy run eagerly, on its own tensors.

    A compiled module keeps wrappers that refer to the *original* module: Lightning's
    ``from_compiled`` (``trainer.fit(torch.compile(model))``) puts dynamo-wrapped step methods
    on the instance, ``torch.compile(submodule)`` wraps the original submodule's ``__call__``,
    ``nn.Module.compile()`` keeps a compiled ``_call_impl``, and any bound method stored on an
    instance is bound to the original. Left alone, the trace would run the real module, and
    under dynamo. Here every wrapper is dropped and every bound method rebound to the copy.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(fake, OptimizedModule):
        fake = fake._orig_mod
    for parent in list(fake.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, OptimizedModule):
                parent._modules[name] = child._orig_mod
    for mod in fake.modules():
        if getattr(mod, "_compiler_ctx", None):
            for name in _STEP_METHODS:
                mod.__dict__.pop(name, None)
            mod._compiler_ctx = None
        if getattr(mod, "_compiled_call_impl", None) is not None:
            mod._compiled_call_impl = None
        for name, value in list(vars(mod).items()):
            if inspect.ismethod(value) and id(value.__self__) in memo:
                setattr(mod, name, types.MethodType(value.__func__, memo[id(value.__self__)]))
    return _quiet_logging(fake)


def _quiet_logging(fake: nn.Module) -> nn.Module:
    """A LightningModule's ``log``/``log_dict`` do nothing in the copy (no memory to speak of; no Trainer)."""
    for mod in fake.modules():
        if callable(getattr(mod, "log_dict", None)):
            mod.log = mod.log_dict = lambda *args, **kwargs: None
    return fake


def rebuild_optimizer(optimizer: torch.optim.Optimizer, mapping: dict[int, Any],
                      overrides: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The same optimizer class, every param group's hyperparameters, on other parameters.

    ``mapping``: ``id(real parameter) -> its stand-in``. The param groups carry
    every hyperparameter (lr, betas, weight decay, fused, foreach, ...), so the
    constructor is given only the arguments it requires; internal defaults a
    class adds itself (AdamW's ``decoupled_weight_decay`` in torch 2.13) never
    reach it, and a user subclass with its own arguments works. Public
    attributes the instance set for itself are copied over.
    """
    groups = []
    for group in optimizer.param_groups:
        params = [mapping[id(p)] for p in group["params"] if id(p) in mapping]
        if params:
            groups.append({**group, **(overrides or {}), "params": params})
    if not groups:
        raise ValueError("the optimizer holds none of the module's parameters")
    cls = type(optimizer)
    required = {}
    for i, (name, p) in enumerate(inspect.signature(cls.__init__).parameters.items()):
        if i < 2 or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue  # self, params, *args, **kwargs, and anything with a default
        if name not in optimizer.defaults:
            raise TypeError(f"cannot rebuild {cls.__name__}: its argument {name!r} is required and not in defaults")
        required[name] = optimizer.defaults[name]
    rebuilt = cls(groups, **required)
    for key, value in vars(optimizer).items():
        if not key.startswith("_") and key not in ("state", "param_groups", "defaults") and key in vars(rebuilt):
            setattr(rebuilt, key, value)
    return rebuilt


def _loss_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"`loss_fn` must return a tensor or a dict with a 'loss' tensor, got {type(out).__name__}.")
    return out


def trace_training_step_memory(*args, **kwargs) -> dict[str, Any]:
    """:func:`_trace` (its docstring says everything); a step that reads a value out of a tensor
    (``loss.item()`` for a print or a log: fake tensors have no values) is traced again with a shape
    environment, in which such a value is a symbol that can be carried but not branched on."""
    return _retrying_value_reads(_trace, *args, **kwargs)


def _retrying_value_reads(trace: Callable[..., dict], *args, **kwargs) -> dict[str, Any]:
    """``trace(*args, **kwargs)``, again with a shape environment if the step read a value out of a tensor."""
    try:
        return trace(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if not _reads_a_value(exc):
            raise
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return trace(*args, shape_env=ShapeEnv(), **kwargs)


def _reads_a_value(exc: BaseException | None) -> bool:
    """Did ``exc`` (or what caused it) come from reading a value out of a fake tensor?"""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    while exc is not None:
        if isinstance(exc, DataDependentOutputException):
            return True
        exc = exc.__cause__
    return False


def _trace(
    module: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Any],
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    optimizer_kwargs: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    optimizer_overrides: dict[str, Any] | None = None,
    manual: bool = False,
    autocast_dtype: torch.dtype | None = None,
    skip: tuple = (),
    shape_env=None,
    watch: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Estimate the peak tensor memory of one steady-state training step, allocating nothing.

    A fake copy of ``module`` is built on the CPU fake device (the real module is
    never touched). The optimizer's state is first created with one fake step on
    zero gradients, so the traced step is a step-2-onwards step: parameters,
    optimizer state, ``loss_fn(module, batch)`` under optional CPU autocast,
    ``backward()`` into ``None`` gradients, ``optimizer.step()``.

    Args:
        module: the model; its tensors may live on any device, including ``meta``.
        batch: a pytree of tensors (any device, ``meta`` included) passed to ``loss_fn``.
        loss_fn: ``loss_fn(module, batch)`` returning a scalar loss tensor, or a
            dict with a ``"loss"`` tensor (e.g. ``lambda m, b: m.training_step(b, 0)``
            for a LightningModule that does not call ``self.log``).
        optimizer_cls: optimizer class, constructed as ``optimizer_cls(params, **optimizer_kwargs)``.
        optimizer_kwargs: keyword arguments for the optimizer. Pass ``foreach=True`` to model
            the default multi-tensor path of optimizers on CUDA (its temporaries are larger).
        optimizer: the run's own optimizer, rebuilt on the fake parameters with every param group's
            hyperparameters (:func:`rebuild_optimizer`); replaces ``optimizer_cls`` and ``optimizer_kwargs``.
        optimizer_overrides: group settings to change in the rebuilt one (e.g. ``{"foreach": True}``).
            A list of optimizers (manual optimization) is rebuilt one by one.
        manual: ``loss_fn`` runs the whole step itself, Lightning's manual optimization: the module's
            ``optimizers()`` give the rebuilt optimizers and ``manual_backward(loss)`` is ``loss.backward()``;
            the peak of the whole step is the forward phase's.
        autocast_dtype: if given (``torch.bfloat16`` or ``torch.float16``), run forward and loss
            under ``torch.autocast("cpu", dtype=autocast_dtype)``.
        skip: objects the module refers to that the copy must not hold (a Trainer): they become None.
        watch: ``{name: tensor}`` of the module's own tensors (W, E): ``written_in_step`` lists those the
            step writes in place outside an optimizer's ``step`` (``.data`` writes included).

    Returns:
        A dict of integer byte counts whose parts sum to ``peak_bytes``:
        ``params_bytes``, ``buffers_bytes``, ``gradients_bytes`` (all gradients of trainable
        parameters), ``optimizer_state_bytes`` (persistent state), ``batch_bytes``,
        ``activations_bytes`` (the rest of the peak: saved activations, activation
        gradients and temporaries, optimizer-step temporaries included), ``peak_bytes``.
        ``train_flops`` counts forward + backward FLOPs (``torch.utils.flop_counter``).
        Also ``forward_peak_bytes``, ``backward_peak_bytes``, ``optimizer_peak_bytes``
        (the peak within each phase, not additive) and ``peak_phase`` (a string, the
        phase in which the overall peak occurs). ``written_in_step``: see ``watch``.
    """
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"`autocast_dtype` can be None, torch.bfloat16 or torch.float16, got {autocast_dtype}.")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
    fmodule, memo = _fake_module(module, fake_mode, skip)
    fbatch = tree_map_only(torch.Tensor, functools.partial(_fake_like, fake_mode), batch)
    params = [p for p in fmodule.parameters() if p.requires_grad]
    if not params:
        raise ValueError("`module` has no parameters with `requires_grad=True`; there is nothing to train.")

    with torch.compiler.set_stance("force_eager"), fake_mode:
        optimizers = _make_optimizers(params, memo, optimizer, optimizer_cls, optimizer_kwargs, optimizer_overrides)
        # Step 1 creates the optimizer state (lazily, as on the first real step).
        for p in params:
            p.grad = torch.zeros_like(p)
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
    if manual:
        _run_manually(fmodule, optimizers)

    states = [list(o.state.values()) for o in optimizers]
    tracker = _step_tracker(fmodule, fbatch, optimizers, memo, watch)
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), fake_mode, tracker:
        tracker.set_phase("forward")
        with counter:
            with autocast:
                out = loss_fn(fmodule, fbatch)
            if not manual:
                loss = _loss_tensor(out)
                tracker.set_phase("backward")
                loss.backward()
                del loss
        del out
        if not manual:
            tracker.set_phase("optimizer")
            for o in optimizers:
                o.step()
    return _step_result(fmodule, params, states, fbatch, tracker, counter)


def _make_optimizers(params: list[nn.Parameter], memo: dict[int, Any], optimizer, optimizer_cls, optimizer_kwargs,
                     optimizer_overrides) -> list[torch.optim.Optimizer]:  # noqa: ANN001
    """The run's own optimizer(s) rebuilt on the fake parameters, or ``optimizer_cls(params, **optimizer_kwargs)``."""
    if optimizer is not None:
        given = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        return [rebuild_optimizer(o, memo, optimizer_overrides) for o in given]
    return [optimizer_cls(params, **(optimizer_kwargs or {}))]


def _step_tracker(fmodule: nn.Module, fbatch: Any, optimizers: list[torch.optim.Optimizer], memo: dict[int, Any],
                  watch: dict[str, torch.Tensor] | None) -> _LiveStorageTracker:
    """A tracker that already counts the persistent tensors (parameters, buffers, batch, optimizer state), sees
    the optimizers' steps, and watches the fake counterparts of ``watch``."""
    tracker = _LiveStorageTracker()
    for name, t in (watch or {}).items():
        fake = memo.get(id(t))
        if isinstance(fake, torch.Tensor):
            tracker.watched[fake.untyped_storage()._cdata] = name
    for o in optimizers:  # an optimizer's own writes to the parameters are what a step is
        o.register_step_pre_hook(lambda *_: setattr(tracker, "in_optimizer", tracker.in_optimizer + 1))
        o.register_step_post_hook(lambda *_: setattr(tracker, "in_optimizer", tracker.in_optimizer - 1))
    states = [list(o.state.values()) for o in optimizers]
    tracker.track((list(fmodule.parameters()), list(fmodule.buffers()), fbatch, states))
    tracker.reset_peak()
    return tracker


def _step_result(fmodule: nn.Module, params: list[nn.Parameter], states: Any, fbatch: Any,
                 tracker: _LiveStorageTracker, counter: FlopCounterMode) -> dict[str, Any]:
    """The traced step's figures (see :func:`_trace`'s Returns)."""
    result = {
        "params_bytes": _storage_bytes(list(fmodule.parameters())),
        "buffers_bytes": _storage_bytes(list(fmodule.buffers())),
        "gradients_bytes": _storage_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer_state_bytes": _storage_bytes(states),
        "batch_bytes": _storage_bytes(fbatch),
    }
    result["activations_bytes"] = tracker.peak_bytes - sum(result.values())
    result["peak_bytes"] = tracker.peak_bytes
    for phase in _PHASES:
        result[f"{phase}_peak_bytes"] = tracker.phase_peak_bytes.get(phase, 0)
    result["peak_phase"] = tracker.peak_phase
    result["train_flops"] = int(counter.get_total_flops())
    result["written_in_step"] = sorted(tracker.written)
    return result


def resize_batch(batch: Any, rows: int, new_rows: int) -> Any:
    """The batch with ``new_rows`` samples: every tensor with ``rows`` rows becomes a ``meta`` tensor of
    ``new_rows`` (tracing needs only shapes and dtypes)."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return torch.empty((new_rows, *t.shape[1:]), dtype=t.dtype, device="meta")
        return t
    return tree_map_only(torch.Tensor, resize, batch)


def _run_manually(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Let a LightningModule's manual-optimization ``training_step`` run on the fake copy: its
    ``optimizers()`` are the rebuilt ones, ``manual_backward`` is ``backward``, toggling does nothing."""
    module.optimizers = lambda use_pl_optimizer=True: optimizers[0] if len(optimizers) == 1 else list(optimizers)
    module.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    module.toggle_optimizer = module.untoggle_optimizer = lambda *args, **kwargs: None
    module.lr_schedulers = lambda: None
