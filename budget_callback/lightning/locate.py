"""Find the unembedding W (and the input embedding E) in any module, as ``(vocab, hidden)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

# Parameter-name suffixes tried in order when the module has no get_output_embeddings().
UNEMBEDDING_NAMES = ("lm_head.weight", "unembed.W_U", "W_U", "unembed.weight", "output.weight", "head.weight",
                     "embed_out.weight", "decoder.weight")
EMBEDDING_NAMES = ("wte.weight", "embed_tokens.weight", "tok_embeddings.weight", "embed.W_E", "W_E",
                   "word_embeddings.weight", "token_embedding.weight", "embedding.weight")


@dataclass
class MatrixSource:
    """Where a (V, D) matrix lives: a getter, a description, and its layout."""

    get: Callable[[], torch.Tensor]  # returns the tensor as stored in the module
    description: str  # e.g. "parameter 'model.lm_head.weight'"
    transposed: bool  # stored as (D, V): transpose on capture
    alternatives: tuple[str, ...] = ()  # other parameters that could have been W (found, not chosen)
    how: str = ""  # how it was chosen, when it was one of several

    def matrix(self) -> torch.Tensor:
        """W as (V, D). A DTensor (FSDP2, tensor parallel) is gathered: every rank must call this."""
        w = self.get().detach()
        if hasattr(w, "full_tensor"):
            w = w.full_tensor()
        return w.t() if self.transposed else w

    def shape(self) -> tuple[int, int]:
        v, d = self.get().shape
        return (d, v) if self.transposed else (v, d)


def _param_source(module: nn.Module, name: str, vocab_hint: int | None) -> MatrixSource:
    params = dict(module.named_parameters(remove_duplicate=False))
    p = params[name]
    if p.dim() != 2:
        raise ValueError(f"`unembedding` parameter {name!r} must be 2-D (vocab x hidden), got shape {tuple(p.shape)}")
    transposed = name.split(".")[-1] == "W_U"  # TransformerLens stores W_U as (d_model, d_vocab)
    if vocab_hint is not None and p.shape[0] != vocab_hint and p.shape[1] == vocab_hint:
        transposed = True
    return MatrixSource(lambda: params[name], f"parameter {name!r}", transposed)


def _find_method(module: nn.Module, method: str) -> nn.Module | None:
    for sub in module.modules():
        fn = getattr(sub, method, None)
        if callable(fn):
            try:
                out = fn()
            except (NotImplementedError, AttributeError, TypeError):
                continue
            if isinstance(out, nn.Module) and isinstance(getattr(out, "weight", None), torch.Tensor):
                return out
    return None


def _name_of(module: nn.Module, tensor: torch.Tensor) -> str:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is tensor:
            return name
    raise LookupError


def find_embedding(module: nn.Module) -> MatrixSource | None:
    """The input embedding E, or ``None`` when none is recognisable."""
    layer = _find_method(module, "get_input_embeddings")
    if layer is not None:
        name = _name_of(module, layer.weight)
        return _param_source(module, name, None)
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    for suffix in EMBEDDING_NAMES:
        for name in names:
            if name == suffix or name.endswith("." + suffix):
                return _param_source(module, name, None)
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        biggest = max(embeddings, key=lambda m: m.num_embeddings)
        return _param_source(module, _name_of(module, biggest.weight), None)
    return None


def find_unembedding(module: nn.Module, spec: str | Callable[[nn.Module], torch.Tensor] | None = None) -> MatrixSource:
    """Locate W. ``spec``: None (auto-detect), a parameter name, or ``callable(module) -> Tensor (V, D)``."""
    embedding = find_embedding(module)
    vocab_hint = embedding.shape()[0] if embedding is not None else None
    if callable(spec):
        def get() -> torch.Tensor:
            out = spec(module)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError("`unembedding` callable must return a 2-D tensor (vocab x hidden)")
            return out
        return MatrixSource(get, f"callable {getattr(spec, '__name__', repr(spec))}", False)
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    if isinstance(spec, str):
        matches = [n for n in names if n == spec or n.endswith("." + spec)]
        if not matches:
            raise ValueError(f"`unembedding` parameter {spec!r} not found; parameters with 2-D shapes: "
                             f"{', '.join(n for n, p in module.named_parameters() if p.dim() == 2)[:500]}")
        return _param_source(module, matches[0], vocab_hint)
    if spec is not None:
        raise ValueError(f"`unembedding` must be None, a parameter name or a callable, got {spec!r}")
    layer = _find_method(module, "get_output_embeddings")
    if layer is not None:
        return _param_source(module, _name_of(module, layer.weight), vocab_hint)
    params = dict(module.named_parameters(remove_duplicate=False))
    for suffix in UNEMBEDDING_NAMES:
        found = []
        for name in names:
            shape = tuple(params[name].shape)
            if vocab_hint is not None and vocab_hint not in shape:
                continue  # a head with this name but not over the vocabulary (a value head, a classifier)
            if (name == suffix or name.endswith("." + suffix)) and len(shape) == 2:
                found.append(name)
        if found:
            return _chosen(module, found, 0, vocab_hint, f"the first parameter named '*{suffix}'")
    if vocab_hint is not None:  # the last linear layer that maps to the vocabulary, whatever its name
        heads = [_name_of(module, m.weight) for m in module.modules()
                 if isinstance(m, nn.Linear) and m.out_features == vocab_hint]
        if heads:
            return _chosen(module, heads, -1, vocab_hint,
                           f"the last linear layer with {vocab_hint} outputs (the embedding's rows)")
    raise ValueError(
        "could not find the unembedding matrix W: tried get_output_embeddings(), a linear layer with as many "
        "outputs as the embedding has rows, and parameters named "
        + ", ".join(UNEMBEDDING_NAMES)
        + ". Pass BudgetCallback(unembedding='<parameter name>') or unembedding=lambda module: <tensor (vocab, hidden)>."
    )


def _chosen(module: nn.Module, names: list[str], pick: int, vocab_hint: int | None, how: str) -> MatrixSource:
    """The source of ``names[pick]``; the others (distinct tensors) recorded as alternatives."""
    source = _param_source(module, names[pick], vocab_hint)
    params = dict(module.named_parameters(remove_duplicate=False))
    chosen = params[names[pick]]
    others = tuple(n for n in names if params[n] is not chosen)
    return replace(source, alternatives=others, how=how) if others else source


def choice_note(w: MatrixSource) -> str | None:
    """Says which of several candidates was recorded as W and how to choose another (None: no choice made)."""
    if not w.alternatives:
        return None
    others = ", ".join(repr(n) for n in w.alternatives[:5])
    return (f"recording W from {w.description}, {w.how}; other candidates: {others}. Pass "
            f"BudgetCallback(unembedding={w.alternatives[0]!r}) (or another name) to record another")


def is_tied(w: MatrixSource, e: MatrixSource | None) -> bool:
    if e is None:
        return False
    a, b = w.get(), e.get()
    if a is b:
        return True
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape and a.device.type != "meta"
    except RuntimeError:
        return False
