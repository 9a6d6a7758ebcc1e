"""Estimate the peak memory of one training step by tracing it with fake tensors.

The step runs on the user's own module with every tensor it holds swapped for a *fake* one
(:class:`.fake_module.FakeModule`: nothing copied, everything put back and checked afterwards) under
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`: every op computes only shapes, dtypes and strides, so no
parameter, activation or optimizer state is ever allocated. A small :class:`TorchDispatchMode` watches the
storages that the ops create and free (through weak references, the way
``torch.distributed._tools.mem_tracker.MemTracker`` does) and records the largest number of live bytes.

The step is run the way Lightning runs it (:mod:`.step_order`): a first step creates the optimizer state and
leaves the gradients alive as a real step does, then the measured step runs ``training_step`` with them alive,
``zero_grad``, backward and the optimizer's update. Questions about values that are known without the data
(a causal mask built from shapes) are answered (:mod:`.known_values`).

The result is *tensor* memory, as a caching allocator would be asked for it; it does not include the CUDA
context, allocator rounding/fragmentation, cuBLAS or NCCL workspaces.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from .fake_module import FakeModule, TraceNotHermetic, fake_like
from .known_values import KnownValues
from .step_order import StepOrder, loss_tensor, run_step
from .torch_internals import FakeTensor, FakeTensorMode, is_data_dependent_error, new_shape_env, storage_key

__all__ = ["StepOrder", "TraceNotHermetic", "rebuild_optimizer", "resize_batch", "trace_steps",
           "trace_training_step_memory"]

_PHASES = ("forward", "backward", "accumulate_forward", "accumulate_backward", "optimizer")


class _LiveStorageTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages and remember the peak, per phase.

    Storages created by dispatched ops are tracked automatically; tensors that
    already exist (parameters, buffers, batch, optimizer state) are registered with
    :meth:`track`. A storage stops counting when its Python object is
    finalised, which for storages means the memory itself is released.

    ``guard``: refuse, before it runs, any op that would write a tensor that is not fake (a real tensor of the
    run reached the trace): :class:`TraceNotHermetic`.
    """

    def __init__(self, guard: bool = False) -> None:
        super().__init__()
        self.guard = guard
        self.watched: dict[int, str] = {}  # storage -> name: in-place writes outside an optimizer step are noted
        self.written: set[str] = set()
        self.in_optimizer = 0
        self._refs: dict[int, weakref.ref] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peak_bytes: dict[str, int] = {}
        self.phase_start_bytes: dict[str, int] = {}
        self.phase_gradient_bytes: dict[str, int] = {}
        self.segment = ""  # within a phase, the part of the model running (the cut stack's blocks: .blocks)
        self.segment_peak_bytes: dict[str, int] = {}  # "phase/segment" -> the peak within it
        self.timeline: list[tuple[str, int]] | None = None  # (phase, live bytes) after every event, when kept

    def track(self, tensors: Any) -> None:
        """Start counting the storages of every tensor in the pytree ``tensors``."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())

    def set_phase(self, phase: str, gradient_bytes: int = 0) -> None:
        """Label subsequent allocations (``forward``, ``backward``, ...); ``gradient_bytes`` are alive as it starts."""
        self.phase = phase
        self.phase_peak_bytes[phase] = self.current_bytes
        self.phase_start_bytes[phase] = self.current_bytes
        self.phase_gradient_bytes[phase] = gradient_bytes
        self.set_segment("before")

    def set_segment(self, segment: str) -> None:
        """Label subsequent allocations within the phase (``before``, ``block_bottom``, ``block_top``, ...)."""
        self.segment = segment
        key = f"{self.phase}/{segment}"
        self.segment_peak_bytes[key] = max(self.segment_peak_bytes.get(key, 0), self.current_bytes)

    def reset_peak(self) -> None:
        """Forget the peak so far; the next peak starts from the current bytes."""
        self.peak_bytes = self.current_bytes
        self.peak_phase = self.phase
        self.phase_peak_bytes = {}
        self.phase_start_bytes = {}
        self.phase_gradient_bytes = {}
        self.segment_peak_bytes = {}

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, functools.partial(self._release, key, nbytes))
        self.current_bytes += nbytes
        if self.current_bytes > self.phase_peak_bytes.get(self.phase, 0):
            self.phase_peak_bytes[self.phase] = self.current_bytes
        key = f"{self.phase}/{self.segment}"
        if self.current_bytes > self.segment_peak_bytes.get(key, 0):
            self.segment_peak_bytes[key] = self.current_bytes
        if self.timeline is not None:
            self.timeline.append((self.phase, self.current_bytes))
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_phase = self.phase

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        del self._refs[key]
        self.current_bytes -= nbytes
        if self.timeline is not None:
            self.timeline.append((self.phase, self.current_bytes))

    def half_peaks(self) -> dict[str, int]:
        """``phase/first_half`` and ``phase/second_half``: the peak in each half of a phase's events (a compiled
        graph shows no blocks: memory moving linearly through identical blocks peaks near one end or the
        middle, each on a line in the depth)."""
        by_phase: dict[str, list[int]] = {}
        for phase, live in self.timeline or ():
            by_phase.setdefault(phase, []).append(live)
        out = {}
        for phase, series in by_phase.items():
            start = self.phase_start_bytes.get(phase, series[0])
            half = len(series) // 2
            out[f"{phase}/first_half"] = max([start, *series[:half]])
            out[f"{phase}/second_half"] = max([start, *series[half:]])
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func._schema.is_mutable and (self.guard or (self.watched and not self.in_optimizer)):
            self._check_writes(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out

    def _check_writes(self, func, args, kwargs) -> None:  # noqa: ANN001
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in tree_leaves(value):
                if not isinstance(t, torch.Tensor):
                    continue
                if self.guard and not isinstance(t, FakeTensor) and t.device.type != "meta":
                    raise TraceNotHermetic(f"the traced step would write a real tensor ({func}, shape "
                                           f"{tuple(t.shape)}): something outside the module's own tensors")
                if self.watched and not self.in_optimizer:
                    name = self.watched.get(storage_key(t))
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


def resize_batch(batch: Any, rows: int, new_rows: int) -> Any:
    """The batch with ``new_rows`` samples: every tensor with ``rows`` rows becomes a ``meta`` tensor of
    ``new_rows`` (tracing needs only shapes and dtypes)."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return torch.empty((new_rows, *t.shape[1:]), dtype=t.dtype, device="meta")
        return t
    return tree_map_only(torch.Tensor, resize, batch)


# --- the session: one fake module, its optimizers, a warm-up step, measured steps ------------------------------


class TraceSession:
    """The state of one trace: the fake mode, the module made fake in place, its rebuilt optimizers.

    Subclassed by the compiled tracer (:mod:`.tracing_compiled`), which installs its compiled regions in
    :meth:`prepare` and runs everything inside :meth:`context`.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], Any], *,
                 optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
                 optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 optimizer_kwargs: dict[str, Any] | None = None, optimizer_overrides: dict[str, Any] | None = None,
                 order: StepOrder | None = None, autocast_dtype: torch.dtype | None = None,
                 watch: dict[str, torch.Tensor] | None = None, shape_env=None,  # noqa: ANN001
                 real_warm_up: bool = False, device: str = "cpu", cut: tuple[Any, int] | None = None) -> None:
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"`autocast_dtype` can be None, torch.bfloat16 or torch.float16, got {autocast_dtype}.")
        self.module, self.loss_fn = module, loss_fn
        self.optimizer, self.optimizer_cls, self.optimizer_kwargs = optimizer, optimizer_cls, optimizer_kwargs
        self.optimizer_overrides = optimizer_overrides
        self.order = order or StepOrder()
        self.autocast_dtype, self.watch = autocast_dtype, watch
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
        self.known = KnownValues(self.fake_mode)
        self.before_backward: Callable[[Any], None] | None = None
        self.real_warm_up = real_warm_up
        self.synthetic = False
        self.device = device  # the fake device: "cpu" (anywhere) or "cuda" (only where CUDA is present)
        self.cut = cut  # (a .blocks.Stack, n): the module traced with its stack cut to its first n blocks

    warm_up_each_batch = False  # the compiled tracer warms up on every batch shape (new graphs are compiled)
    segments_by = "blocks"  # a cut stack's passes are split at its blocks (compiled graphs: "halves")

    def context(self) -> contextlib.AbstractContextManager:
        """Around everything that runs fake code (the compiled tracer adds its stubbed inductor)."""
        return torch.compiler.set_stance("force_eager")

    def prepare(self, fake: FakeModule) -> None:
        """After the module is fake, before anything runs (the compiled tracer installs its regions)."""

    def check(self) -> None:
        """After the steps (the compiled tracer proves its stub ran)."""

    def run(self, batches: list[Any]) -> list[dict[str, Any]]:
        """A warm-up step on ``batches[0]``, then one measured step per batch: the figures of each."""
        with FakeModule(self.module, self.fake_mode, self.device) as fake:
            self._know_buffers(fake)
            if self.cut is not None:
                self.cut[0].cut(self.cut[1])
            self.prepare(fake)
            params = [p for p in self.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError("`module` has no parameters with `requires_grad=True`; there is nothing to train.")
            fbatches = [tree_map_only(torch.Tensor, functools.partial(fake_like, self.fake_mode, device=self.device), b)
                        for b in batches]
            results = []
            with self.context(), self.fake_mode, self.known:
                fake.optimizers[:] = self._optimizers(params, fake.memo)
                for i, fbatch in enumerate(fbatches):
                    if i == 0 or self.warm_up_each_batch:
                        self._warm_up(params, fbatch, fake)
                    results.append(self._measure(params, fbatch, fake))
            self.check()
        return results

    def _warm_up(self, params: list[nn.Parameter], fbatch: Any, fake: FakeModule) -> None:
        """Leave the optimizer state and the gradients as a real step leaves them.

        A whole step (``real_warm_up``: manual optimization, where the user's code decides what stays alive, and
        compiled regions, which compile their graphs here) or, cheaper, a zero gradient for every trainable
        parameter and one optimizer step; the measured step then checks that every one of them really gets a
        gradient (:class:`_UnreachedParameters` otherwise: traced again with a whole warm-up step)."""
        if self.real_warm_up or self.order.manual:
            run_step(self.module, fbatch, self.loss_fn, fake.optimizers, self.order, self.autocast_dtype,
                     before_backward=self.before_backward, device_type=self.device)
            return
        for p in params:
            p.grad = torch.zeros_like(p)
        for o in fake.optimizers:
            o.step()
        self.synthetic = True

    def _know_buffers(self, fake: FakeModule) -> None:
        """Small buffers (masks, position tables) keep their values: questions about them can be answered."""
        for real in fake.real_buffers():
            self.known.know(fake.memo[id(real)], real)

    def _optimizers(self, params: list[nn.Parameter], memo: dict[int, Any]) -> list[torch.optim.Optimizer]:
        if self.optimizer is not None:
            given = list(self.optimizer) if isinstance(self.optimizer, (list, tuple)) else [self.optimizer]
            return [rebuild_optimizer(o, memo, self.optimizer_overrides) for o in given]
        return [self.optimizer_cls(params, **(self.optimizer_kwargs or {}))]

    def _measure(self, params: list[nn.Parameter], fbatch: Any, fake: FakeModule) -> dict[str, Any]:
        tracker = _LiveStorageTracker(guard=True)
        for name, t in (self.watch or {}).items():
            fk = fake.memo.get(id(t))
            if isinstance(fk, torch.Tensor):
                tracker.watched[storage_key(fk)] = name
        for o in fake.optimizers:  # an optimizer's own writes to the parameters are what a step is
            o.register_step_pre_hook(lambda *_: setattr(tracker, "in_optimizer", tracker.in_optimizer + 1))
            o.register_step_post_hook(lambda *_: setattr(tracker, "in_optimizer", tracker.in_optimizer - 1))
        states = [list(o.state.values()) for o in fake.optimizers]
        tracker.track((list(self.module.parameters()), list(self.module.buffers()), fbatch, states,
                       [p.grad for p in params]))
        tracker.reset_peak()
        counter = FlopCounterMode(display=False)

        def phase(name: str) -> None:
            tracker.set_phase(name, _storage_bytes([p.grad for p in params if p.grad is not None]))
        before = _storage_bytes([p.grad for p in params if p.grad is not None])
        reached: set[int] = set()

        def before_backward(loss: torch.Tensor) -> None:
            reached.update(_reached_parameters(loss))
            if self.before_backward is not None:
                self.before_backward(loss)
        hooks = (self._segment_hooks(tracker) if self.cut is not None and not self.order.manual
                 and self.segments_by == "blocks" else [])
        if self.cut is not None and self.segments_by == "halves":
            tracker.timeline = []
        try:
            with tracker, counter:
                run_step(self.module, fbatch, self.loss_fn, fake.optimizers, self.order, self.autocast_dtype, phase,
                         before_backward, self.device)
        finally:
            for hook in hooks:
                hook.remove()
        if self.synthetic and any(id(p) not in reached for p in params):
            raise _UnreachedParameters()
        result = {
            "params_bytes": _storage_bytes(list(self.module.parameters())),
            "buffers_bytes": _storage_bytes(list(self.module.buffers())),
            "gradients_bytes": _storage_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer_state_bytes": _storage_bytes(states),
            "batch_bytes": _storage_bytes(fbatch),
        }
        result["activations_bytes"] = tracker.peak_bytes - sum(result.values())
        result["peak_bytes"] = tracker.peak_bytes
        for name in _PHASES:
            if name in tracker.phase_peak_bytes:
                result[f"{name}_peak_bytes"] = tracker.phase_peak_bytes[name]
                result[f"{name}_gradients_bytes"] = tracker.phase_gradient_bytes[name]
        result.setdefault("backward_peak_bytes", 0)
        result.setdefault("optimizer_peak_bytes", 0)  # manual optimization: the whole step is the forward phase
        result["gradients_alive_bytes"] = before
        result["peak_phase"] = tracker.peak_phase
        result["train_flops"] = int(counter.get_total_flops()) // (2 if self.order.grad_accum > 1 else 1)
        result["written_in_step"] = sorted(tracker.written)
        result["values_answered"] = self.known.answered
        if tracker.timeline is not None:
            result["segments"] = tracker.half_peaks()
        elif hooks:
            result["segments"] = dict(tracker.segment_peak_bytes)
        return result

    def _segment_hooks(self, tracker: _LiveStorageTracker) -> list:
        """Hooks on the cut stack's blocks that label the parts of each pass: in the forward ``before``, the
        bottom block, the blocks between, the top block, ``after``; in the backward (which meets them top
        down, through a hook on each block's output node: no tensor added) ``before`` (the loss and the head),
        the top block, the blocks between, the bottom block and what follows it. Memory moves linearly through a
        stack of identical blocks, so a pass's peak is in one of these parts (:func:`..forecast.memory.
        trace_at_blocks`)."""
        stack, n = self.cut
        blocks = list(stack.container)[:n]
        handles = []

        def name(j: int) -> str:
            return "block_bottom" if j == 0 else "block_top" if j == n - 1 else "block_between"

        def on_node(j: int):
            return lambda *_: tracker.set_segment(name(j))

        for j, block in enumerate(blocks):
            def pre(module, args, j=j):
                if tracker.phase.endswith("forward"):
                    tracker.set_segment(name(j))

            def post(module, args, out, j=j):
                if not tracker.phase.endswith("forward"):
                    return
                first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn), None)
                if first is not None:
                    handles.append(first.grad_fn.register_prehook(on_node(j)))
                if j == n - 1:
                    tracker.set_segment("after")
            handles.append(block.register_forward_pre_hook(pre))
            handles.append(block.register_forward_hook(post))
        return handles


class _UnreachedParameters(Exception):
    """A trainable parameter got no gradient in the measured step: the cheap warm-up gave it one."""


def _reached_parameters(loss: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor the backward of ``loss`` will write a gradient to."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def trace_steps(module: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], Any],
                session: type[TraceSession] = TraceSession, **kwargs: Any) -> list[dict[str, Any]]:
    """One measured step per batch (after one warm-up step), in one session; a step that reads a value out of a
    tensor that is not known before it runs (``loss.item()`` for a print or a log) is traced again with a shape
    environment, in which such a value is a symbol that can be carried but not branched on."""
    for attempt in range(3):
        try:
            return session(module, loss_fn, **kwargs).run(batches)
        except _UnreachedParameters:  # some parameters get no gradient: warm up with a whole step
            kwargs["real_warm_up"] = True
        except Exception as exc:  # noqa: BLE001
            if not is_data_dependent_error(exc) or "shape_env" in kwargs:
                raise
            kwargs["shape_env"] = new_shape_env()
    return session(module, loss_fn, **kwargs).run(batches)


def trace_training_step_memory(module: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any],
                               optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                               optimizer_kwargs: dict[str, Any] | None = None,
                               optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
                               optimizer_overrides: dict[str, Any] | None = None, manual: bool = False,
                               autocast_dtype: torch.dtype | None = None,
                               watch: dict[str, torch.Tensor] | None = None,
                               order: StepOrder | None = None, device: str = "cpu") -> dict[str, Any]:
    """Estimate the peak tensor memory of one steady-state training step, allocating nothing.

    The module's tensors are made fake in place for the trace (:class:`.fake_module.FakeModule`; the real module
    is left as it was, and checked). A warm-up step creates the optimizer state and leaves the gradients alive;
    the measured step then runs in Lightning's order (:class:`.step_order.StepOrder`): ``loss_fn(module, batch)``
    under optional CPU autocast with the previous gradients alive, ``zero_grad``, ``backward()``, the optimizer's
    update.

    Args:
        module: the model; its tensors may live on any device, including ``meta``.
        batch: a pytree of tensors (any device, ``meta`` included) passed to ``loss_fn``.
        loss_fn: ``loss_fn(module, batch)`` returning a scalar loss tensor, or a dict with a ``"loss"`` tensor
            (e.g. ``lambda m, b: m.training_step(b, 0)``; ``self.log`` does nothing while tracing).
        optimizer_cls: optimizer class, constructed as ``optimizer_cls(params, **optimizer_kwargs)``.
        optimizer_kwargs: keyword arguments for the optimizer. Pass ``foreach=True`` to model
            the default multi-tensor path of optimizers on CUDA (its temporaries are larger).
        optimizer: the run's own optimizer, rebuilt on the fake parameters with every param group's
            hyperparameters (:func:`rebuild_optimizer`); replaces ``optimizer_cls`` and ``optimizer_kwargs``.
            A list of optimizers (manual optimization) is rebuilt one by one.
        optimizer_overrides: group settings to change in the rebuilt one (e.g. ``{"foreach": True}``).
        manual: ``loss_fn`` runs the whole step itself, Lightning's manual optimization (shorthand for
            ``order=StepOrder(manual=True)``).
        autocast_dtype: if given (``torch.bfloat16`` or ``torch.float16``), run forward and loss
            under ``torch.autocast(device, dtype=autocast_dtype)``.
        watch: ``{name: tensor}`` of the module's own tensors (W, E): ``written_in_step`` lists those the
            step writes in place outside an optimizer's ``step`` (``.data`` writes included).
        order: how the trainer runs the step (default: Lightning's automatic optimization).
        device: the fake device, ``"cpu"`` (works everywhere) or ``"cuda"`` (where CUDA is present: CUDA's
            kernels' shapes and, compiled, inductor's CUDA partition; on a CPU-only build a fake CUDA backward
            aborts the process).

    Returns:
        A dict of integer byte counts whose parts sum to ``peak_bytes``:
        ``params_bytes``, ``buffers_bytes``, ``gradients_bytes`` (the gradients after the step),
        ``optimizer_state_bytes`` (persistent state), ``batch_bytes``, ``activations_bytes`` (the rest of the
        peak: saved activations, activation gradients, temporaries, gradients alive, optimizer-step temporaries),
        ``peak_bytes``. ``train_flops`` counts forward + backward FLOPs of one micro-batch
        (``torch.utils.flop_counter``). Per phase (``forward``, ``backward``, ``accumulate_forward``,
        ``accumulate_backward``, ``optimizer``, those that ran): ``<phase>_peak_bytes`` (the peak within the
        phase, not additive) and ``<phase>_gradients_bytes`` (gradients alive as the phase starts);
        ``peak_phase`` (a string). ``written_in_step``: see ``watch``. ``values_answered``: data-dependent
        questions answered from values known without the data.

    Raises:
        TraceNotHermetic: the step reached a real tensor; the figures are discarded.
    """
    if order is None:
        order = StepOrder(manual=manual)
    return trace_steps(module, [batch], loss_fn, optimizer=optimizer, optimizer_cls=optimizer_cls,
                       optimizer_kwargs=optimizer_kwargs, optimizer_overrides=optimizer_overrides, order=order,
                       autocast_dtype=autocast_dtype, watch=watch, device=device)[0]
