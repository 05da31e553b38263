"""Growing a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), one layer at a time.

`shard_model` applies ``fully_shard`` the way torchtitan does: each decoder layer is one FSDP
unit, and the root (embeddings, final norm, LM head) another. Every rank then holds a 1/N shard
of every parameter, and of its optimizer state.

A depth step (`grow_sharded`) never gathers the model: the growth transaction
(`arbor.growth.step.GrowthStep`) inserts the new layers as ordinary modules, which every rank
builds whole and alike (one layer at a time; random inits draw the same numbers because every
rank's generator was seeded and has drawn alike); the layers already sharded stay as they are.
The new layers are then sharded with the mesh of the others, the optimizer is handed their
sharded parameters (with any state the init gave them, sharded the same way), and the root is
told to take in the new units at its next forward.

Width steps (FFN, heads, hidden) resize the tensors of existing layers, which needs each
resized layer gathered, grown and sharded again, with its optimizer state; that is not built,
and `grow_sharded` refuses them with a `GrowthError` before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext
from torch.distributed.tensor import DTensor, distribute_tensor

from arbor.growth.optim import rebind
from arbor.growth.step import GrowthResult, GrowthStep
from arbor_plugins.growth import GrowthError, GrowthSpec

__all__ = ["SHARDED_AXES", "grow_sharded", "is_sharded", "mesh_of", "refresh_root", "shard_model"]

#: The growth axes `grow_sharded` takes.
SHARDED_AXES = ("depth",)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh | None = None, **options: Any) -> DeviceMesh:
    """``fully_shard`` every decoder layer of ``model``, then ``model`` itself; returns the mesh.

    ``mesh`` defaults to a 1-D mesh over every rank of the default process group, on the
    device type of the model's parameters. ``options`` go to ``fully_shard``
    (``reshard_after_forward``, ``mp_policy``, ...) for every unit.
    """
    if mesh is None:
        device = next(model.parameters()).device.type
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return mesh


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 unit (``fully_shard`` was applied to it)."""
    return isinstance(model, FSDPModule)


def mesh_of(model: torch.nn.Module) -> DeviceMesh:
    """The device mesh ``model``'s sharded parameters live on."""
    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh
    raise GrowthError("the model has no sharded parameter: shard it with shard_model first")


def refresh_root(model: torch.nn.Module) -> None:
    """Make the FSDP2 root of ``model`` collect its units again at the next forward.

    The root lists the FSDP units below it once, at its first forward (its lazy
    initialisation); units added later would otherwise run as roots of their own. Clearing
    every unit's root flag and the shared context makes the next forward list them anew.
    """
    state = model._get_fsdp_state()
    for unit in list(state._state_ctx.all_states) or [state]:
        unit._is_root = None
    state._state_ctx = FSDPStateContext()


def _shard_new_layer(layer: torch.nn.Module, mesh: DeviceMesh, optimizer, options: dict) -> None:
    plain = dict(layer.named_parameters())
    fully_shard(layer, mesh=mesh, **options)
    if optimizer is None:
        return
    for name, sharded in layer.named_parameters():
        rebind(optimizer, plain[name], sharded)
        state = optimizer.state.get(sharded, {})
        for key, value in state.items():  # moments an init gave the new parameter, sharded like it
            if torch.is_tensor(value) and value.shape == sharded.shape:
                state[key] = distribute_tensor(value, mesh, sharded.placements)


def grow_sharded(step: GrowthStep, model: torch.nn.Module, spec: dict | GrowthSpec | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, options: dict | None = None,
                 **kwargs: Any) -> GrowthResult:
    """Take one growth step of ``spec`` on the FSDP2-sharded ``model``; every rank must call it alike.

    ``step`` is the run's `GrowthStep` (init, insertion policy, freeze policy, optimizer
    settings); ``kwargs`` go to it (``probe``, ``reason``, ``step``, ``tokens``, ``trigger``,
    ``scheduler``). ``options`` go to ``fully_shard`` for the new layers (the run's
    `shard_model` options). Raises `GrowthError`, before changing anything, for an axis
    outside ``SHARDED_AXES``.
    """
    resolved = step.resolve(model, spec)
    if resolved.axis not in SHARDED_AXES:
        raise GrowthError(f"axis={resolved.axis!r} is not supported on a model sharded by FSDP2: only "
                          f"{', '.join(SHARDED_AXES)} steps are; train data parallel (ddp) to grow other axes")
    mesh = mesh_of(model)
    result = step(model, resolved, optimizer=optimizer, **kwargs)
    for index in result.event.layers:
        _shard_new_layer(model.model.layers[index], mesh, optimizer, options or {})
    refresh_root(model)
    return result
