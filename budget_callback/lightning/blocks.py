"""The stack of identical blocks of a module, and the module cut to its first few blocks for a trace.

A transformer's cost to trace grows with its depth (1 s of CPU per layer per compiled trace), but its blocks are
identical: the same code on the same shapes saves the same tensors, and inductor partitions identical graphs
identically. So a step traced with the stack cut to one, two and three blocks gives every byte figure at any
depth, on the line through them (:func:`..forecast.memory.trace_at_blocks`), checked: the three must be on one
line, or the whole model is traced.

Blocks count as identical when every submodule has the same type, the same parameter and buffer shapes, dtypes
and trainability, and the same plain attributes (a block's own index, such as Hugging Face's ``layer_idx``,
aside): a model that alternates local and global attention, or puts an MoE layer every other block, is not cut.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

__all__ = ["Stack", "find_stack"]

_PLAIN = (int, float, str, bool, type(None))


def _signature(block: nn.Module, indexed: frozenset = frozenset()) -> tuple:
    """What makes a block what it is: per submodule its type, tensors and plain attributes (those in
    ``indexed``, ``(submodule, attribute)`` pairs that hold each block's own index, aside)."""
    parts = []
    for name, mod in block.named_modules():
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(mod).items()
                             if not k.startswith("_") and isinstance(v, _PLAIN) and (name, k) not in indexed))
        tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad)
                        for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)])
        parts.append((name, type(mod).__qualname__, attrs, tensors))
    return tuple(parts)


def _index_attributes(blocks: list[nn.Module]) -> frozenset:
    """``(submodule, attribute)`` pairs holding each block's own position (Hugging Face's ``layer_idx``): in
    every block equal to its index."""
    found = None
    for i, block in enumerate(blocks):
        here = {(name, k) for name, mod in block.named_modules() for k, v in vars(mod).items()
                if type(v) is int and v == i}
        found = here if found is None else found & here
    return frozenset(found or ())


class Stack:
    """A ``ModuleList`` / ``Sequential`` of identical blocks (``path`` in the module, ``depth`` blocks)."""

    def __init__(self, path: str, container: nn.Module) -> None:
        self.path, self.container, self.depth = path, container, len(container)

    def cut(self, blocks: int) -> None:
        """Keep the first ``blocks`` blocks (for a trace: :class:`.fake_module.FakeModule` puts them back)."""
        kept = list(self.container._modules.items())[:blocks]
        self.container.__dict__["_modules"] = OrderedDict(kept)

    def describe(self) -> str:
        return f"{self.path or '<root>'} ({self.depth} x {type(self.container[0]).__name__})"


def find_stack(module: nn.Module, at_least: int = 2) -> Stack | None:
    """The deepest stack of identical blocks in ``module`` (None: none of ``at_least`` blocks)."""
    best: Stack | None = None
    for path, mod in module.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < at_least:
            continue
        children: list[Any] = list(mod)
        if len({type(c) for c in children}) != 1:
            continue
        indexed = _index_attributes(children)
        first = _signature(children[0], indexed)
        if all(_signature(c, indexed) == first for c in children[1:]):
            if best is None or len(mod) > best.depth:
                best = Stack(path, mod)
    return best
