"""Estimate the peak memory of one training step of a ``torch.compile``d model, allocating nothing.

The step runs on the user's module made fake in place, in Lightning's step order, as in :mod:`.tracing` (whose
session, tracker, optimizer rebuild and result this module shares); what differs is how the *compiled* parts run:

* Every compiled region of the module (``torch.compile(module)``, a compiled child module, ``module.compile()``,
  a ``torch.compile``d method on the instance, such as Lightning's ``training_step`` after
  ``trainer.fit(torch.compile(model))``, or on the class) is replaced, for the trace only, by a
  :class:`_CompiledRegion`.
* On its first call, in a warm-up step that also creates the optimizer state, the region is compiled by inductor
  itself (``compile_fx``: AOTAutograd with inductor's decompositions, joint-graph passes, the min-cut partitioner,
  lowering, fusion, scheduling, buffer reuse). Only the last step is replaced: the generated Python wrapper is
  executed with no-op kernels and ``empty_strided_cpu`` creating fake tensors
  (:func:`.torch_internals.stubbed_inductor`, which counts the graphs it stubbed: a region compiled by inductor
  without it raises). No kernel is compiled, dynamo is never invoked.
* In the measured step the compiled forward and backward allocate, reuse and free buffers as inductor's code
  would; AOTAutograd saves what the partitioner chose and materialises the zero tangents of returned outputs the
  loss does not use. Code outside the regions (an eager loss, the optimizer) runs eagerly on fake tensors.

Validated against the profiler-measured peak of real CPU steps (whole models and blocks compiled, fp32 and bf16
autocast, AdamW fused/foreach/for-loop, up to GPT-2 small): equal to the byte, one case 12 bytes low.

Limits (the report repeats the ones that matter):

* **torch >= 2.11** (:func:`.torch_internals.compiled_trace_unsupported` says why not on older ones).
* **One graph per region**: graph breaks are not modelled; a region that branches on a tensor's value raises
  :class:`CompiledTraceError`. A value read that is only carried (``print(loss.item())``) is traced (again, with
  a shape environment).
* **Static shapes** (``dynamic=True`` is traced at the batch's shapes).
* **CPU inductor**: code generation is the C++ backend whatever the real device; what is saved for the backward
  is decided before code generation and carries over, except where decompositions differ by device (SDPA
  kernels); Triton's fusion and buffer reuse differ in details. Tensor memory only: no CUDA context, allocator
  rounding, kernel scratch.
* **Modes**: autotuning (``max-autotune``) needs real kernels: switched off, with a warning (autotuned GEMM
  templates are not modelled). CUDA graphs (``reduce-overhead``) are not modelled (their static pool outlives the
  step). Backends: ``inductor``, ``aot_eager``, ``aot_eager_decomp_partition``, ``eager``; any other raises
  :class:`CompiledTraceError`.
* **Process-wide patches** while a trace runs (inductor's code generation, its caches off): don't trace while
  another thread compiles. The module's own compile caches are untouched.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .fake_module import FakeModule
from .step_order import StepOrder
from .torch_internals import (AUTOTUNE_OPTIONS, StubCheck, compile_with_backend, compiled_trace_unsupported,
                              dynamo_context_of, dynamo_orig_callable, forget_pending_unbacked, innermost_backend,
                              is_dynamo_wrapped, is_optimized_module, reparametrize, stubbed_inductor)
from .tracing import TraceSession, trace_steps

__all__ = ["CompiledTraceError", "find_compiled_regions", "trace_compiled_steps", "trace_compiled_training_step_memory"]

_CUDAGRAPH_OPTIONS = ("triton.cudagraphs", "triton.cudagraph_trees")
_SUPPORTED_BACKENDS = ("inductor", "aot_eager", "aot_eager_decomp_partition", "eager")


class CompiledTraceError(RuntimeError):
    """The compiled step could not be traced; the message says why and what to try."""


# --- the compiled regions of the real module ------------------------------------------------------


@dataclass
class CompileSpec:
    """How one region was compiled: where, the backend, its inductor config patches (``mode``/``options``)."""

    backend: str
    config: dict[str, Any] = field(default_factory=dict)
    dynamic: bool | None = None
    where: str = ""

    def describe(self) -> str:
        """E.g. ``blocks.0 (.compile()): inductor, mode max-autotune``."""
        extra = [k for k in (*AUTOTUNE_OPTIONS, *_CUDAGRAPH_OPTIONS) if self.config.get(k)]
        return f"{self.where}: {self.backend}" + (f" ({', '.join(extra)})" if extra else "")


def _spec(compiled: Any, where: str) -> CompileSpec:
    """Backend, mode and options of an ``OptimizedModule`` or a ``torch.compile``d callable."""
    ctx = dynamo_context_of(compiled)
    if ctx is None:
        raise CompiledTraceError(f"cannot find the torch.compile settings of {where}")
    backend = innermost_backend(getattr(ctx, "callback", None))
    name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None) or repr(backend)
    cfg = dict(getattr(backend, "config", {}) or {})
    if name != "inductor" and getattr(backend, "kwargs", None):
        cfg = dict(backend.kwargs)
    return CompileSpec(backend=str(name), config=cfg, dynamic=getattr(backend, "dynamic", None), where=where)


def _class_wrapped(mod: nn.Module) -> Iterator[tuple[str, Any]]:
    """``torch.compile``d functions on the module's class (``@torch.compile`` on a method), nearest class first."""
    seen: set[str] = set()
    for klass in type(mod).__mro__:
        if klass in (nn.Module, object):
            break
        for attr, value in vars(klass).items():
            if attr not in seen and is_dynamo_wrapped(value):
                yield attr, value
            seen.add(attr)


def _regions(module: nn.Module) -> Iterator[tuple[nn.Module, str, Any, str]]:
    """(module, attribute, compiled object, where) of every compiled region: an ``OptimizedModule`` child
    (attribute: its name in the parent), ``_compiled_call_impl``, a compiled callable on the instance or class."""
    if is_optimized_module(module):  # the module itself is torch.compile's wrapper: its forward is the region
        yield module, "forward", module, "<root> (torch.compile)"
    for name, mod in module.named_modules(remove_duplicate=False):
        where = name or "<root>"
        for child_name, child in mod._modules.items():
            if is_optimized_module(child):
                yield mod, child_name, child, f"{where}.{child_name}".removeprefix("<root>.") + " (torch.compile)"
        if is_optimized_module(mod):
            continue
        if getattr(mod, "_compiled_call_impl", None) is not None:
            yield mod, "_compiled_call_impl", mod._compiled_call_impl, f"{where} (.compile())"
        for attr, value in vars(mod).items():
            if attr != "_compiled_call_impl" and is_dynamo_wrapped(value):
                yield mod, attr, value, f"{where}.{attr}"
        for attr, value in _class_wrapped(mod):
            if attr not in vars(mod):
                yield mod, attr, value, f"{where}.{attr} (class)"


def find_compiled_regions(module: nn.Module) -> list[CompileSpec]:
    """The compiled regions of ``module``, each with how it was compiled.

    Found: ``module`` or a descendant being an ``OptimizedModule`` (``torch.compile(m)``), a module with a
    ``_compiled_call_impl`` (``m.compile()``), an instance attribute that is a ``torch.compile``d callable
    (Lightning's ``from_compiled`` wraps ``forward`` and the ``*_step`` methods so), and a ``torch.compile``d
    method on a module's class. Regions inside another are listed too (a trace inlines them, as dynamo does).
    """
    found = []
    seen: set[int] = set()
    for mod, attr, compiled, where in _regions(module):
        key = id(compiled) if not is_optimized_module(compiled) else id(compiled) ^ 1
        if key not in seen:
            seen.add(key)
            found.append(_spec(compiled, where))
    return found


def _inductor_config(spec: CompileSpec) -> dict[str, Any]:
    """The region's inductor config patches, minus autotuning and CUDA graphs (with a warning)."""
    cfg = dict(spec.config)
    dropped = [k for k in (*AUTOTUNE_OPTIONS, *_CUDAGRAPH_OPTIONS) if cfg.get(k)]
    for k in dropped:
        cfg[k] = False
    if dropped:
        warnings.warn(f"compiled region {spec.where}: {', '.join(dropped)} cannot be traced with fake tensors and "
                      "were switched off for the forecast (autotuned GEMM templates and CUDA-graph memory pools are "
                      "not modelled)", stacklevel=4)
    if cfg.get("cpp_wrapper"):  # same scheduler and buffer plan, written in C++: trace the Python wrapper
        cfg["cpp_wrapper"] = False
    return cfg


# --- compiled regions while the module is fake -------------------------------------------------------------


class _TraceState:
    """Shared by the regions of one trace: is a region being compiled (nested ones are inlined)?"""

    def __init__(self) -> None:
        self.compiling = False
        self.compiled_graphs = 0
        self.inductor_regions = 0
        self.known = None  # the session's KnownValues mode: stepped aside while a region is traced into a graph


def _signature(flat: list[Any]) -> tuple:
    """Cache key of a region call: tensor metadata, constants, grad and autocast state."""
    parts = []
    for x in flat:
        if isinstance(x, torch.Tensor):
            parts.append(("T", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type, x.requires_grad))
        else:
            parts.append(("C", type(x).__name__, repr(x)))
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    return tuple(parts), torch.is_grad_enabled(), autocast


def _region_graph(fn: Callable, flat: list[Any], in_spec: Any, n_out: int,
                  before_call: Callable[[], None] = lambda: None) -> fx.GraphModule:
    """A GraphModule whose one call is ``fn``, holding the parameters and buffers of the module ``fn`` is bound to.

    Tensor leaves of the call become placeholders, other leaves constants. Each distinct parameter/buffer is one
    attribute (tied weights are one input, as in the graph dynamo hands a backend) and is swapped into the owner
    for the call. ``compile_fx`` traces through the call with AOTAutograd as it would through a dynamo graph.
    """
    tensor_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    constants = list(flat)
    owner = getattr(fn, "__self__", None)
    owner = owner if isinstance(owner, nn.Module) else None
    root = nn.Module()
    names: list[tuple[str, str]] = []  # (name in owner, attribute of root)
    if owner is not None:
        attr_of: dict[int, str] = {}
        for kind, items in (("p", owner.named_parameters(remove_duplicate=False)),
                            ("b", owner.named_buffers(remove_duplicate=False))):
            for name, t in items:
                if id(t) not in attr_of:
                    attr_of[id(t)] = f"{kind}{len(attr_of)}"
                    (root.register_parameter if kind == "p" else root.register_buffer)(attr_of[id(t)], t)
                names.append((name, attr_of[id(t)]))
    attrs = list(dict.fromkeys(a for _, a in names))

    def _call_region(*values: torch.Tensor) -> tuple:
        before_call()  # AOTAutograd traces the call more than once: each trace starts from the same arguments
        state = dict(zip(attrs, values[: len(attrs)]))
        leaves = list(constants)
        for i, t in zip(tensor_pos, values[len(attrs):]):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, in_spec)
        with (reparametrize(owner, {n: state[a] for n, a in names}) if owner is not None
              else contextlib.nullcontext()):
            out = fn(*args, **kwargs)
        return tuple(x for x in tree_leaves(out) if isinstance(x, torch.Tensor))

    graph = fx.Graph()
    placeholders = [graph.placeholder(f"arg{i}") for i in range(len(tensor_pos))]
    getattrs = [graph.get_attr(a) for a in attrs]
    call = graph.call_function(_call_region, (*getattrs, *placeholders))
    graph.output(tuple(graph.call_function(operator.getitem, (call, i)) for i in range(n_out)))
    return fx.GraphModule(root, graph)


def _compile_backend(spec: CompileSpec, gm: fx.GraphModule, example: list[torch.Tensor]) -> Callable:
    """Compile the region graph with the region's backend (inductor: kernels stubbed)."""
    if spec.backend not in _SUPPORTED_BACKENDS or spec.backend == "eager":
        raise CompiledTraceError(f"compiled region {spec.where}: backend {spec.backend!r} is not supported by the "
                                 f"compiled-memory tracer (supported: {', '.join(_SUPPORTED_BACKENDS)})")
    return compile_with_backend(spec.backend, gm, example, _inductor_config(spec))


class _CompiledRegion:
    """Stands for a compiled callable while the module is fake; compiles ``fn`` (the uncompiled callable) once per
    input signature, then runs the compiled function. Called while another region compiles, it is inlined."""

    def __init__(self, fn: Callable, spec: CompileSpec, state: _TraceState) -> None:
        self.fn, self.spec, self.state = fn, spec, state
        self.cache: dict[tuple, tuple[Callable, list[Any], Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.compiling or self.spec.backend == "eager":
            return self.fn(*args, **kwargs)
        flat, in_spec = tree_flatten((args, kwargs))
        key = _signature(flat)
        if key not in self.cache:
            self.cache[key] = self._compile(flat, in_spec)
        compiled, out_leaves, out_spec = self.cache[key]
        outs = iter(compiled(*[x for x in flat if isinstance(x, torch.Tensor)]))
        return tree_unflatten([next(outs) if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec)

    def _compile(self, flat: list[Any], in_spec: Any) -> tuple[Callable, list[Any], Any]:
        args, kwargs = tree_unflatten(flat, in_spec)
        forget_pending_unbacked(flat)
        self.state.compiling = True
        known = self.state.known
        if known is not None:
            known.enabled = False
        objects = _ObjectState(flat)
        try:
            with torch.no_grad():  # a dry run gives the output structure
                out = self.fn(*args, **kwargs)
            objects.restore()  # what the call did to its arguments (a KV cache filled) is undone
            forget_pending_unbacked(flat)
            out_leaves, out_spec = tree_flatten(out)
            gm = _region_graph(self.fn, flat, in_spec, sum(isinstance(x, torch.Tensor) for x in out_leaves),
                               objects.restore)
            compiled = _compile_backend(self.spec, gm, [x for x in flat if isinstance(x, torch.Tensor)])
            objects.restore()
        except CompiledTraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - said, with its cause, by the error
            raise CompiledTraceError(
                f"compiled region {self.spec.where} cannot be traced as one graph with fake tensors "
                f"({type(exc).__name__}: {str(exc)[:200]}); the compiled forecast assumes each region is one graph "
                "without data-dependent control flow (what fullgraph=True accepts)") from exc
        finally:
            self.state.compiling = False
            if known is not None:
                known.enabled = True
        self.state.compiled_graphs += 1
        self.state.inductor_regions += self.spec.backend == "inductor"
        return compiled, out_leaves, out_spec


class _ObjectState:
    """The state of the plain Python objects a region is called with (a ``DynamicCache``): tracing a call twice (a
    dry run, then AOTAutograd) would otherwise leave their tensors twice in them, and a traced tensor kept in an
    argument becomes a fake constant of the next graph. Their tensors are kept as they are, the rest copied.
    (Such side effects are not replayed when the compiled region runs: dynamo would, and a cache filled in the
    forward keeps its keys and values alive until the model's output is dropped.)"""

    def __init__(self, flat: list[Any]) -> None:
        self.saved: list[tuple[Any, dict]] = []
        for x in flat:
            if isinstance(x, (torch.Tensor, nn.Module)) or not hasattr(x, "__dict__") or callable(x):
                continue
            memo = {id(t): t for t in _tensors_in(vars(x))}
            try:
                self.saved.append((x, copy.deepcopy(dict(vars(x)), memo)))
            except Exception:  # noqa: BLE001 - an object that cannot be copied is left as it is
                continue

    def restore(self) -> None:
        for obj, attrs in self.saved:
            vars(obj).clear()
            vars(obj).update(copy.deepcopy(attrs, {id(t): t for t in _tensors_in(attrs)}))


def _tensors_in(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in ``value`` and in the attributes of the objects it holds (a few levels down)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 4 or isinstance(value, nn.Module):
        return []
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    elif hasattr(value, "__dict__") and not callable(value):
        items = list(vars(value).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, depth + 1)]


class _FakeOptimizedModule(nn.Module):
    """Stands for an ``OptimizedModule`` while the module is fake: calls ``_orig_mod`` through a region."""

    def __init__(self, orig: nn.Module, spec: CompileSpec, state: _TraceState) -> None:
        super().__init__()
        self._orig_mod = orig
        self._region = _CompiledRegion(orig.__call__, spec, state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._region(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


def _install(mod: nn.Module, attr: str, compiled: Any, where: str, state: _TraceState) -> None:
    """Replace one compiled region of the (fake) module by a :class:`_CompiledRegion`; :class:`.FakeModule` puts
    the original back."""
    spec = _spec(compiled, where)
    if is_optimized_module(compiled) and compiled is mod:  # the root wrapper: its forward calls the original
        object.__setattr__(mod, "forward", _CompiledRegion(compiled._orig_mod.__call__, spec, state))
        return
    if is_optimized_module(compiled):
        mod._modules[attr] = _FakeOptimizedModule(compiled._orig_mod, spec, state)
        return
    if attr == "_compiled_call_impl":
        target = mod._call_impl
    else:
        orig = dynamo_orig_callable(compiled)
        if isinstance(orig, types.FunctionType) and attr not in vars(mod):  # a compiled function on the class
            target = types.MethodType(orig, mod)
        else:  # a bound method (of this very module, now fake) or a plain function on the instance
            target = orig
    object.__setattr__(mod, attr, _CompiledRegion(target, spec, state))


class CompiledTraceSession(TraceSession):
    """A :class:`.tracing.TraceSession` whose compiled regions are compiled by inductor with stubbed kernels."""

    warm_up_each_batch = True  # static shapes: a new batch shape compiles new graphs, outside the measurement
    segments_by = "halves"  # one graph: its blocks are not seen, a cut stack's passes are split in halves

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state, self.stubs = _TraceState(), StubCheck()
        self.real_warm_up = True  # a whole step: it compiles the regions' graphs
        self.state.known = self.known
        self.before_backward = forget_pending_unbacked

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        # force_eager: a torch.compile'd callable that is no region (a free function) runs eagerly, never dynamo
        with torch.compiler.set_stance("force_eager"), stubbed_inductor(self.stubs) as switched_off:
            if switched_off:
                warnings.warn(f"torch._inductor.config: {', '.join(switched_off)} switched off for the forecast",
                              stacklevel=4)
            yield

    def prepare(self, fake: FakeModule) -> None:
        for mod, attr, compiled, where in list(_regions(self.module)):
            _install(mod, attr, compiled, where, self.state)

    def check(self) -> None:
        if self.stubs.graphs < self.state.inductor_regions:
            raise CompiledTraceError(
                f"inductor compiled {self.state.inductor_regions} region(s) but its code generation was stubbed "
                f"for {self.stubs.graphs} graph(s): this torch version compiles differently from what the tracer "
                "was written for; forecast as eager")


def trace_compiled_steps(module: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], Any],
                         **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`.tracing.trace_steps` with the module's compiled regions compiled (see the module docstring).

    Raises:
        CompiledTraceError: this torch cannot trace compiled steps, a region cannot be traced as one graph, or
            uses an unsupported backend.
    """
    why = compiled_trace_unsupported()
    if why:
        raise CompiledTraceError(why)
    return trace_steps(module, batches, loss_fn, session=CompiledTraceSession, **kwargs)


def trace_compiled_training_step_memory(module: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any],
                                        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                                        optimizer_kwargs: dict[str, Any] | None = None,
                                        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
                                        optimizer_overrides: dict[str, Any] | None = None, manual: bool = False,
                                        autocast_dtype: torch.dtype | None = None,
                                        watch: dict[str, torch.Tensor] | None = None,
                                        order: StepOrder | None = None, device: str = "cpu") -> dict[str, Any]:
    """Estimate the peak tensor memory of one steady-state training step of a compiled model, allocating nothing.

    The arguments and the result are :func:`.tracing.trace_training_step_memory`'s. The warm-up step compiles
    every compiled region (inductor, kernels stubbed: see the module docstring) and creates the optimizer state;
    the measured step runs with the gradients it left alive, in Lightning's order. Parts that are not compiled
    run eagerly; with no compiled region at all the figures are the eager tracer's.

    Raises:
        CompiledTraceError: see :func:`trace_compiled_steps`.
    """
    if order is None:
        order = StepOrder(manual=manual)
    return trace_compiled_steps(module, [batch], loss_fn, optimizer=optimizer, optimizer_cls=optimizer_cls,
                                optimizer_kwargs=optimizer_kwargs, optimizer_overrides=optimizer_overrides,
                                order=order, autocast_dtype=autocast_dtype, watch=watch, device=device)[0]
