"""Every private torch name the fit-start trace touches, in one place.

The tracers (:mod:`.tracing`, :mod:`.tracing_compiled`, :mod:`.fake_module`, :mod:`.known_values`) use only
what this module exports. Each private name is read here, under a version gate where it is known to be missing
on part of the declared range (torch >= 2.6), and what depends on an internal proves at run time that it ran
(:class:`StubCheck`): if inductor stops calling the stubbed code generation, a compiled trace would compile real
kernels and nothing would notice, so the trace is discarded instead and the report says why.

Written for and tested on torch 2.13 (CI) and the oldest declared torch, 2.6: the compiled tracer needs
torch >= 2.11 (``innermost_backend`` appeared in 2.11; 2.6 also lacks ``GraphLowering._compile_to_module_lines``)
and :func:`compiled_trace_unsupported` says so in words; the eager tracer works on the whole range.
"""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "COMPILED_TRACE_MIN_TORCH", "FakeTensor", "FakeTensorMode", "StubCheck", "compile_with_backend",
    "compiled_trace_unsupported", "disable_dispatch_modes", "dynamo_context_of", "dynamo_orig_callable",
    "forget_pending_unbacked", "innermost_backend", "is_data_dependent_error", "is_dynamo_wrapped",
    "is_optimized_module", "new_shape_env", "reparametrize", "storage_key", "stubbed_inductor", "torch_version",
]

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402 - stable since torch 2.0

COMPILED_TRACE_MIN_TORCH = (2, 11)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def compiled_trace_unsupported() -> str | None:
    """Why this torch cannot trace a compiled step (None: it can). Said in the report of a compiled run."""
    missing = []
    from torch._dynamo import eval_frame

    if not hasattr(eval_frame, "innermost_backend"):
        missing.append("torch._dynamo.eval_frame.innermost_backend")
    from torch._inductor.graph import GraphLowering

    if not hasattr(GraphLowering, "_compile_to_module_lines"):
        missing.append("GraphLowering._compile_to_module_lines")
    if torch_version() < COMPILED_TRACE_MIN_TORCH or missing:
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        return (f"the compiled tracer needs torch >= {'.'.join(map(str, COMPILED_TRACE_MIN_TORCH))}; this is "
                f"torch {torch.__version__}{lacks}")
    return None


# --- dynamo: what torch.compile left on a module ------------------------------------------------------------


def is_optimized_module(obj: Any) -> bool:
    """``torch.compile(module)``'s wrapper."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(obj, OptimizedModule)


def is_dynamo_wrapped(obj: Any) -> bool:
    """A callable ``torch.compile`` returned (a function or a bound method)."""
    return callable(obj) and hasattr(obj, "_torchdynamo_orig_callable")


def dynamo_orig_callable(obj: Any) -> Any:
    """What ``torch.compile`` wrapped."""
    return obj._torchdynamo_orig_callable


def _is_dynamo_context(value: Any) -> bool:
    from torch._dynamo.eval_frame import _TorchDynamoContext

    return isinstance(value, _TorchDynamoContext)


def dynamo_context_of(obj: Any) -> Any:
    """The ``OptimizeContext`` behind an ``OptimizedModule`` or a ``torch.compile``d callable (None: not found)."""
    if is_optimized_module(obj):
        return obj.dynamo_ctx
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if _is_dynamo_context(value):
            return value
    return None


def is_dynamo_context(value: Any) -> bool:
    """Lightning's ``_compiler_ctx`` and a compiled callable's closure hold one: never copied, never traced."""
    return _is_dynamo_context(value)


def innermost_backend(callback: Any) -> Any:
    """The user's backend behind a dynamo callback (``torch._dynamo.eval_frame.innermost_backend`` from torch 2.11;
    the same unwrapping of ``_torchdynamo_orig_backend`` / ``_torchdynamo_orig_callable`` before)."""
    from torch._dynamo import eval_frame

    if hasattr(eval_frame, "innermost_backend"):
        return eval_frame.innermost_backend(callback)
    fn = callback
    for _ in range(32):
        inner = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "_torchdynamo_orig_callable", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return fn


# --- fake tensors, dispatch, shapes --------------------------------------------------------------------------


def storage_key(t: torch.Tensor) -> int:
    """An identity of the storage behind ``t`` (shared by its views)."""
    return t.untyped_storage()._cdata


@contextlib.contextmanager
def disable_dispatch_modes() -> Iterator[None]:
    """Run real ops on real tensors from inside a dispatch mode: the modes (the fake mode, the tracker) set aside
    and Python dispatch off (inside a mode's handler the fake mode is still reached otherwise)."""
    from torch.utils._mode_utils import no_dispatch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), no_dispatch():
        yield


def new_shape_env() -> Any:
    """A shape environment: a value read out of a fake tensor becomes a symbol that can be carried."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return ShapeEnv()


def is_data_dependent_error(exc: BaseException | None) -> bool:
    """Did ``exc`` (or what caused it) come from reading a value out of a fake tensor?"""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    except ImportError:  # pragma: no cover - every declared torch has it
        GuardOnDataDependentSymNode = DataDependentOutputException  # noqa: N806
    while exc is not None:
        if isinstance(exc, (DataDependentOutputException, GuardOnDataDependentSymNode)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def forget_pending_unbacked(tensors: Any) -> None:
    """Drop unbacked symbols a value read (``.item()``) left pending in *eager* fake code: nothing consumes them
    outside a graph trace, and inductor's propagation of the next compiled graph would reject them."""
    from torch._guards import detect_fake_mode
    from torch.utils._pytree import tree_leaves

    mode = detect_fake_mode([t for t in tree_leaves(tensors) if isinstance(t, torch.Tensor)])
    if mode is not None and mode.shape_env is not None:
        pending = getattr(mode.shape_env, "pending_fresh_unbacked_symbols", None)
        if pending is not None:
            pending.clear()


def reparametrize(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """``module``'s parameters and buffers by name swapped for ``tensors`` for a block (``torch.func``'s own)."""
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(module, tensors)


# --- inductor with its kernels stubbed out --------------------------------------------------------------------


class StubCheck:
    """Counts the inductor graphs whose code generation the stub replaced: a region compiled by inductor with no
    stub call means inductor generated code some other way (real kernels): the trace is not to be trusted."""

    def __init__(self) -> None:
        self.graphs = 0


class _NoOpKernel:
    """Stands for a compiled kernel: calling it (or ``.run``) does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def run(self, *args: Any, **kwargs: Any) -> None:
        return None


class _StubAsyncCompile:
    """``AsyncCompile`` while a wrapper is executed: every kernel factory returns a no-op kernel."""

    def wait(self, scope: dict[str, Any]) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., _NoOpKernel]:
        return lambda *args, **kwargs: _NoOpKernel()


def _fake_empty_strided_cpu(size, stride, dtype):  # noqa: ANN001
    return torch.empty_strided(size, stride, dtype=dtype, device="cpu")


def _fake_empty_strided_cuda(size, stride, dtype):  # noqa: ANN001
    return torch.empty_strided(size, stride, dtype=dtype, device="cuda")


def _fake_reinterpret_tensor(t: torch.Tensor, size, stride, offset):  # noqa: ANN001
    return torch.as_strided(t, size, stride, t.storage_offset() + offset)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


_WRAPPER_OVERRIDES = {
    "empty_strided_cpu": _fake_empty_strided_cpu,
    "empty_strided_cuda": _fake_empty_strided_cuda,
    "reinterpret_tensor": _fake_reinterpret_tensor,
    "assert_size_stride": _no_op,
    "assert_alignment": _no_op,
}


class UnsupportedInductor(RuntimeError):
    """Inductor generated code the stub does not recognise."""


def _stub_compile_to_module_lines(check: StubCheck) -> Callable:
    def compile_to_module_lines(self, wrapper_code):  # noqa: ANN001
        """``GraphLowering._compile_to_module_lines`` that executes the wrapper with no-op kernels, compiling
        nothing: the wrapper's ``call(args)`` keeps its allocations, ``# reuse`` lines and ``del`` statements; the
        allocation helpers create fake tensors."""
        import torch._inductor.async_compile as async_compile
        from torch._inductor.codecache import PyCodeCache

        source = wrapper_code.value
        if "async_compile = AsyncCompile()" not in source:
            raise UnsupportedInductor("unrecognised inductor wrapper code (no 'async_compile = AsyncCompile()'); "
                                      "this torch version's inductor is not supported by the compiled tracer")
        key, path = PyCodeCache.write(source)
        module = types.ModuleType(f"budget_fake_inductor_{key}")
        module.__file__ = path
        old = async_compile.AsyncCompile
        async_compile.AsyncCompile = _StubAsyncCompile
        try:
            exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - inductor's own generated code
        finally:
            async_compile.AsyncCompile = old
        for name, value in {**getattr(self, "constants", {}), **getattr(self, "torchbind_constants", {})}.items():
            setattr(module, name, value)  # what inductor's loader attaches (lifted tensor constants)
        for name, fn in _WRAPPER_OVERRIDES.items():
            setattr(module, name, fn)
        self.cache_key, self.cache_path, self.cache_linemap = key, path, []
        check.graphs += 1
        return module
    return compile_to_module_lines


AUTOTUNE_OPTIONS = ("max_autotune", "max_autotune_gemm", "max_autotune_pointwise", "coordinate_descent_tuning")


@contextlib.contextmanager
def stubbed_inductor(check: StubCheck) -> Iterator[list[str]]:
    """For the whole trace (AOTAutograd compiles the backward lazily, at the first ``backward()``): inductor's code
    generation stubbed (``check`` counts each graph), no compile caches (nothing stubbed can reach a real compile),
    no autotuning. Yields the global autotuning options that were switched off."""
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    on = [k for k in AUTOTUNE_OPTIONS if getattr(inductor_config, k, False)]
    old = GraphLowering._compile_to_module_lines
    GraphLowering._compile_to_module_lines = _stub_compile_to_module_lines(check)
    patches = {k: False for k in ("fx_graph_cache", "fx_graph_remote_cache", "autotune_local_cache",
                                  "autotune_remote_cache", *AUTOTUNE_OPTIONS) if hasattr(inductor_config, k)}
    # the C++ kernels' bodies are generated only to be stubbed: scalar ones cost a quarter less CPU than vectorized
    # ones and allocate, free and reuse the same buffers (the kernels never run; the tests compare real steps)
    patches["cpp.simdlen"] = 1
    try:
        with inductor_config.patch(**patches), torch._functorch.config.patch(enable_autograd_cache=False):
            yield on
    finally:
        GraphLowering._compile_to_module_lines = old


def compile_with_backend(backend: str, gm: torch.fx.GraphModule, example: list[torch.Tensor],
                         config_patches: dict[str, Any] | None) -> Callable:
    """Compile ``gm`` the way ``torch.compile(backend=...)`` would after dynamo (inductor: kernels stubbed by
    :func:`stubbed_inductor`)."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example, config_patches=config_patches or None)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(backend)(gm, example)


# --- FSDP2 (fully_shard) ----------------------------------------------------------------------------------------


def is_fsdp2_unit(module: torch.nn.Module) -> bool:
    """A module ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def is_fsdp2_hook(hook: Any) -> bool:
    """A forward hook FSDP2 registered (its ``FSDPState``'s ``_pre_forward`` / ``_post_forward``): it gathers and
    reshards parameters with collectives, which a fake step must not run."""
    owner = getattr(hook, "__self__", None)
    return type(owner).__name__ == "FSDPState"


def fsdp2_gathered_dtype(unit: torch.nn.Module, param: torch.Tensor) -> torch.dtype:
    """The dtype a unit's parameter is all-gathered in: its ``MixedPrecisionPolicy.param_dtype``, else its own."""
    try:
        policy = unit._get_fsdp_state()._mp_policy
        return policy.param_dtype or param.dtype
    except AttributeError:
        return param.dtype


# --- dynamo's own counters ---------------------------------------------------------------------------------------


def graph_break_counts() -> dict[str, int]:
    """Dynamo's graph breaks so far in this process, by reason, and the frames it gave up on and ran eagerly
    (``frames not compiled``: a graph break inside a loop skips the whole frame), from
    ``torch._dynamo.utils.counters``."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - every declared torch has it
        return {}
    out = {str(k): int(v) for k, v in counters["graph_break"].items()}
    skipped = int(counters["frames"].get("total", 0)) - int(counters["frames"].get("ok", 0))
    if skipped > 0:
        out["frames not compiled (run eagerly)"] = skipped
    return out
