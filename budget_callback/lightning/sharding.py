"""What a sharded module holds per device, read off the module before its step is traced.

FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) turns each unit's
parameters into DTensors sharded over the data-parallel ranks and all-gathers a unit's parameters around its
forward and backward through hooks on the module. The trace runs the step unsharded (the hooks set aside by
:class:`.fake_module.FakeModule`, every DTensor traced at its global shape); the per-device figures come from
the shards and the units found here (:class:`..forecast.memory.ShardedModel`), by FSDP2's rules:

* this device holds its shard of every parameter, gradient and optimizer state (dim-0 padded to the world);
* the root unit's parameters are gathered from the start of the forward to the end of the backward (the root is
  not resharded after its forward): they are alive at both ends of the step, where its peak is;
* a block's parameters are gathered around its own forward and backward only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..forecast.memory import ShardedModel
from .torch_internals import fsdp2_gathered_dtype, is_fsdp2_hook, is_fsdp2_unit

__all__ = ["is_fsdp2_hook", "sharded_model"]


def _local_storage_bytes(p: Any) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.untyped_storage().nbytes()


def sharded_model(module: nn.Module, world_size: int = 1) -> ShardedModel | None:
    """This device's share of an FSDP2 module (None: no ``fully_shard`` unit in it)."""
    units = [m for m in module.modules() if is_fsdp2_unit(m)]
    if not units:
        return None
    owner: dict[int, nn.Module] = {}
    for unit in units:  # outermost first: a nested unit takes its own parameters over
        for p in unit.parameters():
            owner[id(p)] = unit
    gathered: dict[int, int] = {id(u): 0 for u in units}
    params = list(module.parameters())
    for p in params:
        unit = owner.get(id(p))
        if unit is not None:
            gathered[id(unit)] += p.numel() * fsdp2_gathered_dtype(unit, p).itemsize
    blocks = [gathered[id(u)] for u in units[1:]]
    return ShardedModel(
        local_params_bytes=sum(_local_storage_bytes(p) for p in params),
        local_numel=sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        full_numel=sum(p.numel() for p in params),
        root_unit_bytes=gathered[id(units[0])],
        largest_unit_bytes=max(blocks, default=0),
        units=len(units),
        full_params_bytes=sum(p.numel() * p.element_size() for p in params),
        world_size=max(1, world_size),
    )
