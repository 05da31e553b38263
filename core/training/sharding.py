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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext
from torch.distributed.tensor import DTensor, distribute_tensor

from arbor.growth.optim import rebind
from arbor.growth.step import GrowthResult, GrowthStep
from arbor_plugins.growth import GrowthError, GrowthSpec

__all__ = ["SHARDED_AXES", "check_growth_settings", "full_model_state", "full_optimizer_state", "grow_sharded", "is_sharded", "mesh_of",
           "refresh_root", "shard_model", "shard_optimizer_state"]

#: The growth axes `grow_sharded` takes.
SHARDED_AXES = ("depth",)
#: Depth inits `grow_sharded` refuses: they copy existing layers (``copy.deepcopy``), which FSDP2,
#: holding only a shard of each, does not allow.
COPYING_INITS = ("stack", "copy-neighbor")


def check_growth_settings(growth: dict[str, Any]) -> None:
    """Refuse, before a sharded run starts, growth settings that name an axis outside ``SHARDED_AXES``
    or an init of ``COPYING_INITS``.

    ``growth`` is a run's ``growth`` table (`arbor.training.trainer.GrowthSettings`): its ``step``
    and the steps its trigger's settings list (``trigger_settings.growth``). A trigger that picks
    its step only when it fires is checked then, by `grow_sharded`.
    """
    listed = (growth.get("trigger_settings") or {}).get("growth")
    steps = [growth.get("step"), *(listed if isinstance(listed, list) else [listed])]
    for spec in steps:
        axis = spec.get("axis", "depth") if isinstance(spec, dict) else None
        if axis is not None and axis not in SHARDED_AXES:
            raise ValueError(f"growth: a step on axis={axis!r} cannot run on a model sharded by FSDP2 (only "
                             f"{', '.join(SHARDED_AXES)} steps can); train data parallel (--parallel ddp) to grow "
                             "other axes")
    for init in [growth.get("init"), *(spec.get("init") for spec in steps if isinstance(spec, dict))]:
        _check_init(init, ValueError)


def _check_init(init: Any, error: type[Exception]) -> None:
    name = init[0] if isinstance(init, (tuple, list)) else init
    if name in COPYING_INITS:
        raise error(f"growth: init={name!r} copies existing layers, which a model sharded by FSDP2 holds only a "
                    f"shard of; use another init (zero, masked) or train data parallel (--parallel ddp)")


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


def shard_optimizer_state(optimizer: torch.optim.Optimizer, params=None) -> None:
    """Shard, like its parameter, every whole state tensor ``optimizer`` holds for a sharded parameter.

    What a resumed run loaded from a checkpoint, or an init gave a new parameter, is the whole
    tensor on every rank; each rank keeps its own shard of it. ``params`` limits this to those.
    """
    for p in optimizer.state if params is None else params:
        if not isinstance(p, DTensor):
            continue
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                state[key] = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of the sharded ``model``, on rank 0's CPU (empty on the other ranks).

    Every rank must call it: each parameter is gathered in turn (torch.distributed.checkpoint's
    full state dict with CPU offload), so no rank holds more than one whole tensor on its device.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied parameter (the LM head of tied embeddings) is saved once, as unsharded
            state.pop(name, None)
        seen.add(id(p))
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered whole, as one process would hold it.

    Every rank must call it (one gather per tensor, in the same order on every rank); the
    gathered tensors go to the CPU where ``keep`` is true (rank 0) and are dropped elsewhere.
    """
    saved = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    saved["state"] = {index: {key: _whole(value, keep) for key, value in state.items()}
                      for index, state in saved["state"].items()}
    return saved


def _whole(value: Any, keep: bool) -> Any:
    if not isinstance(value, DTensor):
        return value
    whole = value.full_tensor()
    return whole.cpu() if keep else None


def _shard_new_layer(layer: torch.nn.Module, mesh: DeviceMesh, optimizer, options: dict) -> None:
    plain = dict(layer.named_parameters())
    fully_shard(layer, mesh=mesh, **options)
    if optimizer is None:
        return
    for name, sharded in layer.named_parameters():
        rebind(optimizer, plain[name], sharded)
    shard_optimizer_state(optimizer, [p for _, p in layer.named_parameters()])  # moments an init gave them


def grow_sharded(growth_step: GrowthStep, model: torch.nn.Module, spec: dict | GrowthSpec | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, options: dict | None = None,
                 **kwargs: Any) -> GrowthResult:
    """Take one growth step of ``spec`` on the FSDP2-sharded ``model``; every rank must call it alike.

    ``growth_step`` is the run's `GrowthStep` (init, insertion policy, freeze policy, optimizer
    settings); ``kwargs`` go to it (``probe``, ``reason``, ``step``, ``tokens``, ``trigger``,
    ``scheduler``). ``options`` go to ``fully_shard`` for the new layers (the run's
    `shard_model` options). Raises `GrowthError`, before changing anything, for an axis
    outside ``SHARDED_AXES`` or an init of ``COPYING_INITS``.
    """
    resolved = growth_step.resolve(model, spec)
    if resolved.axis not in SHARDED_AXES:
        raise GrowthError(f"axis={resolved.axis!r} is not supported on a model sharded by FSDP2: only "
                          f"{', '.join(SHARDED_AXES)} steps are; train data parallel (ddp) to grow other axes")
    _check_init(resolved.init, GrowthError)
    mesh = mesh_of(model)

    def shard_new_layers(model, event) -> None:  # before the freeze policy and the second probe
        for index in event.layers:
            _shard_new_layer(model.model.layers[index], mesh, optimizer, options or {})
        refresh_root(model)

    return growth_step(model, resolved, optimizer=optimizer, prepare=shard_new_layers, **kwargs)
