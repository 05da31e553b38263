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

A width step of the layers (FFN, heads) resizes the tensors of existing layers. It runs one
layer at a time: the layer is gathered whole (its parameters and optimizer moments, as an
ordinary module in place of its FSDP unit), the step is taken on that layer alone (the same
transaction, the same absolute target), and the grown layer is sharded again before the next is
gathered; so no rank holds more than one whole layer beyond its shards. The probe runs once
before the first layer and once after the last, and the layers' records are merged into one.
Hidden-size steps resize the embeddings and every layer at once and are refused with a
`GrowthError` before anything changes, as are inits that copy layers (`COPYING_INITS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext
from torch.distributed.tensor import DTensor, distribute_tensor

from arbor.compat import copy_checkpointing
from arbor.growth.operators import record_all_layers
from arbor.growth.optim import rebind
from arbor.growth.step import GrowthResult, GrowthStep
from arbor_plugins.growth import GrowthError, GrowthEvent, GrowthSpec

__all__ = ["SHARDED_AXES", "check_growth_settings", "full_model_state", "full_optimizer_state", "grow_sharded", "is_sharded", "mesh_of",
           "refresh_root", "shard_model", "shard_optimizer_state"]

#: The growth axes `grow_sharded` takes; width axes one layer at a time.
SHARDED_AXES = ("depth", "ffn", "heads")
WIDTH_AXES = ("ffn", "heads")
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

    if resolved.axis in WIDTH_AXES:
        return _grow_width(growth_step, model, resolved, mesh, optimizer, options or {}, kwargs)
    return growth_step(model, resolved, optimizer=optimizer, prepare=shard_new_layers, **kwargs)


def _gather_layer(model: torch.nn.Module, index: int, optimizer) -> None:
    """Put an unsharded layer in the place of sharded layer ``index``, with its optimizer state whole.

    The new layer holds the old one's own submodules (with whatever hooks and state plugins gave
    them, such as a masked init's ramps), their parameters gathered whole.
    """
    old = model.model.layers[index]
    with torch.device("meta"):
        whole = model.model.layer_class(model.config, index)
    for name, child in list(old.named_children()):
        setattr(whole, name, child)
    copy_checkpointing(old, [whole])
    with torch.no_grad():
        for name, p in list(whole.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            q = torch.nn.Parameter(p.full_tensor() if isinstance(p, DTensor) else p, requires_grad=p.requires_grad)
            setattr(whole.get_submodule(owner_name), attr, q)
            if optimizer is None:
                continue
            state = optimizer.state.pop(p, None)
            rebind(optimizer, p, q)
            if state is not None:
                optimizer.state[q] = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    left = [n for n, t in [*whole.named_parameters(), *whole.named_buffers()] if t.is_meta]
    if left:
        raise GrowthError(f"layer {index} cannot be gathered for a width step: {left[:3]} are not the layer's "
                          "submodules' tensors")
    model.model.layers[index] = whole


def _grow_width(growth_step: GrowthStep, model, resolved: GrowthSpec, mesh: DeviceMesh, optimizer, options: dict,
                kwargs: dict[str, Any]) -> GrowthResult:
    """A width step on a sharded model: gather, grow and shard again one layer at a time (see the module doc)."""
    op = growth_step.operation(model, resolved)
    indices = list(op.layers) if op.layers is not None else list(range(len(model.model.layers)))
    kwargs = dict(kwargs)
    probe, trigger = kwargs.pop("probe", None), kwargs.pop("trigger", None)
    before = probe() if probe is not None else None  # on the sharded model, before any layer is gathered
    results = []
    for k, index in enumerate(indices):
        last = k == len(indices) - 1
        answers = [None, probe]  # the last layer's step: no probe before it (taken above), the real one after

        def probe_once(answers=answers):
            value = answers.pop(0)
            return value() if callable(value) else value

        _gather_layer(model, index, optimizer)

        def shard_again(model, event, index=index) -> None:
            _shard_new_layer(model.model.layers[index], mesh, optimizer, options)
            refresh_root(model)

        results.append(growth_step(model, dataclasses.replace(op, layers=[index]), optimizer=optimizer,
                                   probe=probe_once if last and probe is not None else None, prepare=shard_again,
                                   **kwargs))
    if op.layers is None:  # what the operator records for an all-layers step, which it now saw layer by layer
        record_all_layers(model.config, op.axis, op.target, op.kv_target)
    event = GrowthEvent(axis=op.axis, layers=[i for r in results for i in r.event.layers])
    for r in results:
        for name in ("old_shapes", "new_shapes", "resized", "renamed"):
            getattr(event, name).update(getattr(r.event, name))
        event.new_parameters.extend(r.event.new_parameters)
    event.init, event.reason = results[-1].event.init, results[-1].event.reason
    event.exact = all(r.event.exact for r in results)
    record = dict(results[-1].record)
    after = record["loss_after"]
    record.update(spec=resolved.model_dump(exclude_unset=True), positions=list(event.layers), exact=event.exact,
                  new_parameters=len(event.new_parameters), loss_before=before,
                  seconds=sum(r.record["seconds"] for r in results),
                  params_before=results[0].record["params_before"], layers_before=results[0].record["layers_before"])
    if event.exact and before is not None and after is not None and not growth_step.same_loss(before, after):
        record["exact"], record["claimed_exact"] = False, True
    if trigger is not None:
        trigger.grew(kwargs.get("step"), kwargs.get("tokens"), model, event)
    return GrowthResult(event, record)
