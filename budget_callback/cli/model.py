"""``budget-callback plan --model pkg.module:factory`` (or ``--hf-config config.json``): any model, before it runs.

The factory is called under ``torch.device("meta")``: the model is built with no memory behind it. Its step is
then measured exactly as the callback measures it at fit start (:func:`..lightning.measure.measure_module`:
traced in Lightning's order with fake tensors, compiled with ``--compile``, a deep stack of identical blocks
extrapolated), with the run the command line describes: the same report and ``--json`` schema as
``BudgetCallback.forecast``.

* The factory returns a ``LightningModule`` (its ``training_step`` and ``configure_optimizers`` are used; an
  optimizer that cannot be built without a Trainer, or on the meta device, is replaced by ``--optimizer``, said
  in the notes) or an ``nn.Module`` (trained with ``--optimizer``; the loss is the cross-entropy of its logits,
  or the ``.loss`` of a Hugging Face model given ``labels``).
* The batch is ``(x, y)``, token ids of ``--batch-size`` x ``--seq-len`` in ``[0, vocab)`` (shapes only: they are
  never allocated), or what ``--batch pkg.module:fn`` returns for ``fn(batch_size, seq_len)``.
* ``--hf-config``: ``transformers`` (optional, never a dependency) builds the causal LM of a local
  ``config.json``, no weights, no network.

Imports torch, Lightning and the user's code: the rest of ``plan`` imports neither.
"""

from __future__ import annotations

import contextlib

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..forecast.engine import Measured, PlanInputs
from ..forecast.memory import ShardedModel
from ..forecast.shapes import ModelShape

__all__ = ["ModelError", "build_model", "measure_planned"]


class ModelError(ValueError):
    """Bad ``--model`` / ``--hf-config`` / ``--batch``: the message names the flag and what to change."""


def _load(spec: str, flag: str) -> Any:
    """``pkg.module:attr`` imported (the current directory first on the path, as ``python -m`` has it)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"{flag} takes MODULE:CALLABLE (e.g. mypkg.models:make_model), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - the user's module: say what failed
        raise ModelError(f"{flag}: cannot import {module_name!r} ({type(err).__name__}: {err})") from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{flag}: {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"{flag}: {spec!r} is not callable")
    return target


@dataclass
class PlannedModel:
    """The model as the plan measures it: the module (on the meta device), the batch, how its loss is taken."""

    module: nn.Module
    batch: Any
    loss_fn: Any  # loss_fn(module, batch), or None: ``module.training_step(batch, 0)``
    optimizers: list[torch.optim.Optimizer]
    manual: bool
    description: str
    notes: list[str] = field(default_factory=list)


def _hf_model(path: str) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise ModelError("--hf-config needs the `transformers` package (pip install transformers); it is optional "
                         "and never installed with budget-callback") from err
    if not os.path.exists(path):
        raise ModelError(f"--hf-config: no such file {path!r} (a model's config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - transformers' own words
        raise ModelError(f"--hf-config: transformers cannot build a causal LM from {path!r} "
                         f"({type(err).__name__}: {str(err)[:200]})") from err


def _optimizers_of(module: nn.Module) -> list[torch.optim.Optimizer]:
    """``configure_optimizers()`` in any of the forms Lightning accepts, as a list of optimizers."""
    out = module.configure_optimizers()
    if isinstance(out, dict):
        out = out["optimizer"]
    if isinstance(out, torch.optim.Optimizer):
        return [out]
    if isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple)):
        out = out[0]  # ([optimizers], [schedulers])
    found = [o["optimizer"] if isinstance(o, dict) else o for o in out]
    if not found or not all(isinstance(o, torch.optim.Optimizer) for o in found):
        raise TypeError(f"configure_optimizers() returned {type(out).__name__}, not optimizers")
    return found


@contextlib.contextmanager
def _stand_in_trainer(module: nn.Module, args: Any):
    """``module.trainer`` while ``configure_optimizers()`` runs: what the plan knows of the run, nothing else."""
    from types import SimpleNamespace

    stand_in = SimpleNamespace(estimated_stepping_batches=args.steps, max_steps=args.steps, max_epochs=None,
                               accumulate_grad_batches=args.grad_accum, num_devices=args.devices,
                               num_nodes=args.num_nodes, world_size=args.devices * args.num_nodes)
    module._trainer = stand_in
    try:
        yield
    finally:
        module._trainer = None


def _cli_optimizer(args: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    name = args.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=args.momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[args.optimizer_impl]
    if impl.get("fused"):  # fused needs real devices: the same state, traced without the fused kernel
        impl = {"foreach": False}
    return cls(params, **impl)


def _lm_loss(vocab: int):
    def loss(module: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], batch[1]
        try:
            out = module(input_ids=x, labels=y)  # a Hugging Face model computes its own loss
            if getattr(out, "loss", None) is not None:
                return out.loss
        except TypeError:
            out = module(x)
        if isinstance(out, dict):  # {"logits": ...} or a ModelOutput without a loss
            out = out["logits"] if "logits" in out else next(iter(out.values()))
        if isinstance(out, (tuple, list)):
            out = out[0]
        logits = getattr(out, "logits", out)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss


def build_model(args: Any) -> PlannedModel:
    """The user's model from ``--model`` or ``--hf-config`` (on the meta device) and its batch."""
    import lightning.pytorch as pl

    with torch.device("meta"):
        if args.hf_config:
            obj, description = _hf_model(args.hf_config), f"--hf-config {args.hf_config}"
        else:
            factory = _load(args.model, "--model")
            try:
                obj = factory()
            except Exception as err:  # noqa: BLE001 - the user's factory: say what failed
                raise ModelError(f"--model: {args.model}() raised {type(err).__name__}: {str(err)[:200]}") from err
            description = f"--model {args.model}"
    if not isinstance(obj, nn.Module):
        raise ModelError(f"--model: {args.model}() returned {type(obj).__name__}, not a LightningModule or an "
                         "nn.Module")
    notes = []
    if any(p.device.type != "meta" for p in obj.parameters()):
        notes.append("the factory built parameters off the meta device (allocated): build them with the device "
                     "you are given (torch.device('meta') is active while it runs)")
    lightning = isinstance(obj, pl.LightningModule)
    params = [p for p in obj.parameters() if p.requires_grad]
    optimizers = None
    if lightning:
        try:
            with torch.device("meta"):
                optimizers = _optimizers_of(obj)
        except Exception:  # noqa: BLE001 - a scheduler that asks the Trainer (OneCycleLR's total steps)
            try:
                with torch.device("meta"), _stand_in_trainer(obj, args):
                    optimizers = _optimizers_of(obj)
                notes.append("configure_optimizers() asked for the Trainer: it ran with a stand-in that knows the "
                             "run's flags (estimated_stepping_batches = --steps)")
            except Exception as err:  # noqa: BLE001 - something else the plan cannot stand in for
                notes.append(f"configure_optimizers() could not run without a Trainer ({type(err).__name__}: "
                             f"{str(err)[:120]}): traced with --optimizer {args.optimizer}")
    if optimizers is None:
        optimizers = [_cli_optimizer(args, params)]
    vocab = _vocab(obj)
    seq = args.seq_len
    if args.batch:
        make = _load(args.batch, "--batch")
        with torch.device("meta"):
            try:
                batch = make(args.batch_size, seq)
            except Exception as err:  # noqa: BLE001 - the user's function: say what failed
                raise ModelError(f"--batch: {args.batch}(batch_size, seq_len) raised {type(err).__name__}: "
                                 f"{str(err)[:200]}") from err
    else:
        shape = (args.batch_size, seq)
        batch = (torch.empty(shape, dtype=torch.long, device="meta"), torch.empty(shape, dtype=torch.long, device="meta"))
    module = obj
    if args.compile:
        module = _compiled(obj, lightning)
    return PlannedModel(module, batch, None if lightning else _lm_loss(vocab), optimizers,
                        lightning and not obj.automatic_optimization, description, notes)


def _compiled(module: nn.Module, lightning: bool) -> nn.Module:
    """What ``trainer.fit(torch.compile(model))`` trains (Lightning's ``from_compiled``), or the compiled module."""
    compiled = torch.compile(module)
    if lightning:
        from lightning.pytorch.utilities.compile import from_compiled

        return from_compiled(compiled)
    return compiled


def _vocab(module: nn.Module) -> int:
    from ..lightning.locate import find_unembedding

    return find_unembedding(module).shape()[0]


def planned_fsdp(module: nn.Module, world_size: int) -> ShardedModel | None:
    """What FSDP2 would hold per device with each block of the model's stack wrapped (``fully_shard`` on every
    block, then on the model, as Lightning's and torchtitan's examples do): 1/world of every parameter, the
    root unit (everything outside the blocks) gathered whole."""
    from ..lightning.blocks import find_stack

    stack = find_stack(module, at_least=1)
    params = list(module.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    numel = sum(p.numel() for p in params)
    in_blocks = {id(p) for p in stack.container.parameters()} if stack is not None else set()
    block = sum(p.numel() * p.element_size() for p in stack.container[0].parameters()) if stack is not None else 0
    root = sum(p.numel() * p.element_size() for p in params if id(p) not in in_blocks)
    return ShardedModel(local_params_bytes=-(-full // world_size), local_numel=-(-numel // world_size),
                        full_numel=numel, root_unit_bytes=root, largest_unit_bytes=block,
                        units=1 + (stack.depth if stack is not None else 0), full_params_bytes=full,
                        world_size=world_size)


def measure_planned(planned: PlannedModel, inputs: PlanInputs) -> tuple[Measured, ModelShape, list[str]]:
    """The callback's own measurement of the planned model for the run in ``inputs``; the shape stands in for
    the snapshot layout (V, D, tying) unless the model declares its own."""
    from ..lightning import inputs as R
    from ..lightning.locate import find_embedding, find_unembedding, is_tied
    from ..lightning.measure import StepContext, measure_module
    from ..lightning.step_order import StepOrder
    from ..snapshots.format import SnapshotLayout

    module = planned.module
    w = find_unembedding(module)
    V, D = w.shape()
    tied = is_tied(w, find_embedding(module))
    setup = inputs.setup
    declared = R.find_shape(module)
    shape = declared or ModelShape(vocab_size=V, d_model=D, n_layer=1, n_head=1, n_ctx=setup.seq_len or 1,
                                   tied=tied, name=type(getattr(module, "_orig_mod", module)).__name__)
    snap = inputs.snapshot
    layout = SnapshotLayout(V, D, snap.dtype, snap.snapshots_per_file, snap.include_embedding, tied)
    sharded = planned_fsdp(module, setup.world_size) if setup.strategy == "fsdp" and setup.world_size > 1 else None
    from dataclasses import replace

    ctx = StepContext(setup, layout, StepOrder(manual=planned.manual, grad_accum=setup.grad_accum),
                      planned.optimizers, inputs.gpu is not None, replace(inputs, shape=shape).capture_bytes(),
                      sharded=sharded, loss_fn=planned.loss_fn)
    measured, notes = measure_module(module, planned.batch, ctx, declared)
    return measured, shape, planned.notes + notes
