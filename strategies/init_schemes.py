"""Built-in init schemes: how the new parts of a growth step start.

The growth operators always build the new parts the "zero" way first (new
units read with random weights and write zeros into the residual stream), so
every scheme here starts from an exact model and rewrites only new parts:

========== ======= ===================== ===============================================
name       exact   axes                  what it does
========== ======= ===================== ===============================================
zero       yes     all                   nothing more (Gesmundo & Maile 2023)
split      yes     ffn, heads            new units copy old ones; the copies share the
                                         original's outgoing weight, with noise that
                                         cancels (Net2Net / HyperCloning); moments
                                         scaled as in Staged Training
masked     yes     all                   new parts random, but multiplied by a mask
                                         that ramps 0 -> 1 over ``ramp_steps`` training
                                         forwards (MSG)
copy-      no      depth                 a new layer copies its nearest old layer, plus
neighbor                                 optional noise (the Arbor seed)
stack      no      depth                 new layers repeat the trained stack in order,
                                         appended at the end by default (G_stack)
========== ======= ===================== ===============================================
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from pydantic import Field

from arbor_plugins import InitScheme, StrictSettings


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _std(model) -> float:
    return float(model.config.initializer_range)


# ----------------------------------------------------------------------- zero
class ZeroInit(InitScheme):
    description = "new outgoing weights zero, new layers start as the identity (exact)"
    exact = True

    def initialize(self, model, event, settings) -> None:
        """The operators already built it this way."""


# ---------------------------------------------------------------------- split
class SplitSettings(StrictSettings):
    #: Std of the symmetry-breaking noise added to the copies' outgoing weights
    #: (it sums to zero over each original and its copies, so it cancels exactly).
    noise_std: float = Field(1e-3, ge=0.0)


def _share(weight: torch.Tensor, group: torch.Tensor, width: int, noise_std: float) -> torch.Tensor:
    """Outgoing weights for units that duplicate others.

    ``weight`` is ``(out, units * width)`` with unit ``u``'s columns at
    ``u*width : (u+1)*width``; ``group[u]`` is the unit whose function unit
    ``u`` computes (itself for originals). Every member of a group gets the
    group's original columns divided by the group size, plus noise whose sum
    over the group is zero, so the members' total output is the original's.
    """
    out = weight.shape[0]
    units = group.numel()
    cols = weight.view(out, units, width)
    counts = torch.bincount(group, minlength=units).to(weight.dtype)
    shared = cols[:, group] / counts[group].view(1, -1, 1)
    if noise_std > 0:
        noise = torch.randn_like(shared) * noise_std
        mean = torch.zeros_like(cols).index_add_(1, group, noise) / counts.clamp(min=1).view(1, -1, 1)
        noise = noise - mean[:, group]
        alone = counts[group] == 1  # a unit without copies keeps its weights untouched
        noise[:, alone] = 0
        shared = shared + noise
    return shared.reshape(out, units * width), counts


def _ramping(module, dim: int) -> set[int]:
    """Positions along weight dimension ``dim`` of ``module`` that a masked step is still ramping in."""
    return {int(j) for m in active_masks_of(module) if m.index is not None and m.weight_dim() == dim
            for j in m.index.tolist()}


def _unit_index(units: torch.Tensor, width: int) -> torch.Tensor:
    """Column (or row) indices of whole units of ``width`` elements."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).reshape(-1)


class SplitInit(InitScheme):
    description = "new FFN units / heads duplicate old ones, outgoing weights shared with cancelling noise (exact)"
    exact = True
    axes = ("ffn", "heads")
    Settings = SplitSettings

    def initialize(self, model, event, settings: SplitSettings) -> None:
        remap_masks(model, event)  # positions of units still ramping in, after this step's permutation
        if event.axis == "ffn":
            for i in event.layers:
                self._split_mlp(model, event, i, settings.noise_std)
        else:
            for i in event.layers:
                self._split_heads(model, event, i, settings.noise_std)

    @staticmethod
    def _moments(event, name: str, counts_old: torch.Tensor, dim: int, dst: torch.Tensor, src: torch.Tensor,
                 ndim: int = 2) -> None:
        if counts_old is not None:
            shape = [1] * ndim
            shape[dim] = -1
            first = (1.0 / counts_old).view(shape)
            event.moment_scales[name] = (first, first * first)  # Staged Training: m/k, v/k^2
        event.moment_sources[name] = (dim, dst, src)

    def _split_mlp(self, model, event, i: int, noise_std: float) -> None:
        prefix = f"model.layers.{i}.mlp."
        params = _params(model)
        down = params[prefix + "down_proj.weight"]
        old = event.resized[prefix + "down_proj.weight"].old_shape[1]
        new = down.shape[1]
        device = down.device
        # Units still behind a "masked" step's ramp cannot be duplicated exactly: a copy would be unmasked.
        ramping = _ramping(model.model.layers[i].mlp.down_proj, 1)
        order = torch.tensor([u for u in torch.randperm(old).tolist() if u not in ramping], dtype=torch.long)
        if not len(order):
            return  # nothing to duplicate exactly: the new units stay as the zero scheme built them
        order = order.to(device)
        added = torch.arange(old, new, device=device)
        group = torch.cat([torch.arange(old, device=device), order[(added - old) % len(order)]])
        for proj in ("gate_proj", "up_proj"):
            w = params[prefix + proj + ".weight"]
            w[added] = w[group[added]]
            self._moments(event, prefix + proj + ".weight", None, 0, added, group[added])
        shared, counts = _share(down.data, group, 1, noise_std)
        down.copy_(shared)
        self._moments(event, prefix + "down_proj.weight", counts[:old], 1, added, group[added])

    def _split_heads(self, model, event, i: int, noise_std: float) -> None:
        prefix = f"model.layers.{i}.self_attn."
        params = _params(model)
        attn = model.model.layers[i].self_attn
        hd = attn.head_dim
        q_info = event.resized[prefix + "q_proj.weight"]
        q_new, kv_new = attn.num_heads, attn.num_key_value_heads
        k_info = event.resized.get(prefix + "k_proj.weight")
        kv_old = k_info.old_shape[0] // hd if k_info is not None else kv_new
        q_old = q_info.old_shape[0] // hd
        device = attn.q_proj.weight.device
        old_slots = q_info.old_positions[0].view(q_old, hd)[:, 0] // hd  # where old head h sits now
        g_new = q_new // kv_new
        # Source of every slot: itself for old heads; for a new slot, an old head of the same kv
        # group (round-robin), or for a new kv group, of the old group it copies.
        group = torch.full((q_new,), -1, dtype=torch.long, device=device)
        group[old_slots] = old_slots
        slot_of_old = {int(s): int(s) for s in old_slots}
        ramping = {c // hd for c in _ramping(attn.o_proj, 1)}  # copies of a ramping head would be unmasked
        by_kv: dict[int, list[int]] = {}
        for s in old_slots.tolist():
            if s not in ramping:
                by_kv.setdefault(s // g_new, []).append(s)
        turn: dict[int, int] = {}
        for s in range(q_new):
            if s in slot_of_old:
                continue
            kv = s // g_new
            source_kv = kv if kv < kv_old else kv % kv_old
            members = by_kv.get(source_kv)
            if not members:
                continue  # no head to duplicate exactly: this slot stays as the zero scheme built it
            group[s] = members[turn.get(source_kv, 0) % len(members)]
            turn[source_kv] = turn.get(source_kv, 0) + 1
        added = torch.tensor([s for s in range(q_new) if s not in slot_of_old and group[s] >= 0],
                             dtype=torch.long, device=device)
        group = torch.where(group >= 0, group, torch.arange(q_new, device=device))  # zero-built slots: alone
        q = params[prefix + "q_proj.weight"]
        rows_dst, rows_src = _unit_index(added, hd), _unit_index(group[added], hd)
        q[rows_dst] = q[rows_src]
        self._moments(event, prefix + "q_proj.weight", None, 0, rows_dst, rows_src)
        if kv_new > kv_old:
            new_kv = torch.arange(kv_old, kv_new, device=device)
            kv_dst, kv_src = _unit_index(new_kv, hd), _unit_index(new_kv % kv_old, hd)
            for proj in ("k_proj", "v_proj"):
                w = params[prefix + proj + ".weight"]
                w[kv_dst] = w[kv_src]
                self._moments(event, prefix + proj + ".weight", None, 0, kv_dst, kv_src)
        o = params[prefix + "o_proj.weight"]
        shared, counts = _share(o.data, group, hd, noise_std)
        o.copy_(shared)
        # Moment scales are applied in the OLD layout: old head h's columns get 1/count of its slot.
        per_old_col = counts[old_slots].repeat_interleave(hd)
        self._moments(event, prefix + "o_proj.weight", per_old_col, 1, rows_dst, rows_src)


# --------------------------------------------------------------------- masked
class MaskedSettings(StrictSettings):
    #: Training forwards over which the mask ramps from 0 to 1 (then it is removed).
    ramp_steps: int = Field(1000, ge=1)


class _Ramp:
    """A value that climbs from 0 to 1 by ``1/steps`` per training forward of the model.

    The count of forwards lives in a 0-d tensor (``count``) that the masks read
    and `_advance` bumps in place, so a model compiled with ``fullgraph=True``
    ramps inside its graph, without a graph break or a recompilation per step.
    Eager forwards also keep it as a Python int (``done``), so no step waits on
    the device to read it; after a compiled forward (``stale``) the int is
    read back from the tensor the next time it is needed.
    """

    def __init__(self, steps: int, done: int = 0, device: torch.device | str | None = None):
        self.steps, self.done, self.stale = steps, done, False
        self.count = torch.tensor(float(done), device=device)
        self.handles: list[Any] = []

    def forwards(self) -> int:
        """Training forwards this ramp has seen."""
        if self.stale:
            self.done, self.stale = int(self.count.item()), False
        return self.done

    def set(self, done: int) -> None:
        self.done, self.stale = done, False
        self.count.fill_(float(done))

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """The ramp's value as a 0-d tensor of ``like``'s dtype and device."""
        return (self.count / self.steps).clamp(max=1.0).to(device=like.device, dtype=like.dtype)

    @property
    def value(self) -> float:
        return min(1.0, self.forwards() / self.steps)


class _Mask:
    """Multiplies the masked units of a module's input (``"in"``) or output (``"out"``) by a ramp.

    ``index`` lists the masked positions along the last dimension; ``None``
    masks the whole tensor (a new layer's residual contribution).
    """

    def __init__(self, module, side: str, index: torch.Tensor | None, ramp: _Ramp, event):
        self.module, self.side, self.index, self.ramp = module, side, index, ramp
        # not id(): ids of dead events are reused. A mask restored from a checkpoint has no event.
        self.created_by = weakref.ref(event) if event is not None else _no_event
        self.followed = self.created_by  # the last growth step whose permutation `remap_masks` applied
        module._arbor_masks = [*getattr(module, "_arbor_masks", []), self]  # so split can see what is ramping
        if side == "in":
            ramp.handles.append(module.register_forward_pre_hook(lambda m, args: (self.apply(args[0]), *args[1:])))
        else:
            ramp.handles.append(module.register_forward_hook(lambda m, args, out: self.apply(out)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        value = self.ramp.tensor(x)
        if self.index is None:
            return x * value
        mask = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device).index_fill(0, self.index.to(x.device), value)
        return x * mask

    def weight_dim(self) -> int:
        return 1 if self.side == "in" else 0


def _no_event() -> None:
    return None


def active_masks_of(module) -> list[_Mask]:
    """Masks of ``masked`` growth steps still ramping on ``module``."""
    return [m for m in getattr(module, "_arbor_masks", []) if m.ramp.value < 1.0]


def _advance(model) -> None:
    """Forward pre-hook of a model with masks: every training forward moves each ramp one step;
    an eager forward also drops the masks of ramps that are fully open (then the identity)."""
    masks = getattr(model, "_arbor_masks", [])
    if not (model.training and torch.is_grad_enabled()):
        return
    ramps: list[_Ramp] = []
    for mask in masks:
        if not any(mask.ramp is r for r in ramps):
            ramps.append(mask.ramp)
    for ramp in ramps:
        ramp.count.add_(1)
    if torch.compiler.is_compiling():
        # A graph cannot remove hooks; an open ramp's masks multiply by 1 until an eager forward
        # (or a growth step, a save) drops them.
        for ramp in ramps:
            ramp.stale = True
        return
    for ramp in ramps:
        if ramp.stale:
            ramp.forwards()  # reads the count back, this forward included
        else:
            ramp.done += 1
        if ramp.value >= 1.0:  # fully open: the mask is the identity now, so drop it
            for handle in ramp.handles:
                handle.remove()
    model._arbor_masks = [m for m in masks if m.ramp.value < 1.0]


def bake_masks(model) -> int:
    """Fold the current mask values into the weights and drop the masks; returns how many were baked.

    The function is unchanged (a mask on a linear layer's input scales its
    weight's columns, one on an output scales rows), so the model can be saved
    and loaded without arbor's masks; training then goes on without the ramp.
    """
    masks = getattr(model, "_arbor_masks", [])
    with torch.no_grad():
        for mask in masks:
            value, weight = mask.ramp.value, mask.module.weight
            if mask.index is None:
                weight.mul_(value)
                continue
            # An embedding's output dimension is its weight's columns; a linear layer's, its rows.
            dim = mask.weight_dim() if isinstance(mask.module, torch.nn.Linear) else 1
            index = mask.index.to(weight.device)
            weight.index_copy_(dim, index, weight.index_select(dim, index) * value)
    for ramp in {id(m.ramp): m.ramp for m in masks}.values():
        ramp.set(ramp.steps)
        for handle in ramp.handles:
            handle.remove()
    model._arbor_masks = []
    return len(masks)


def mask_state(model) -> dict[str, Any] | None:
    """The masks still ramping in on ``model`` and how far each ramp has gone (None: no masks).

    Module names, sides, masked positions and ramps (steps, forwards done): all
    a resumed run needs to rebuild the same masks (`load_mask_state`).
    """
    masks = getattr(model, "_arbor_masks", [])
    if not masks:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    ramps: dict[int, int] = {}
    saved = []
    for mask in masks:
        saved.append({"module": names[id(mask.module)], "side": mask.side, "ramp": ramps.setdefault(id(mask.ramp), len(ramps)),
                      "index": None if mask.index is None else mask.index.detach().cpu().clone()})
    by_id = {id(m.ramp): m.ramp for m in masks}
    return {"masks": saved, "ramps": [{"steps": by_id[i].steps, "done": by_id[i].forwards()} for i in ramps]}


def load_mask_state(model, state: dict[str, Any] | None) -> None:
    """Rebuild the masks `mask_state` saved (replacing any the model has), ramps where they were."""
    for ramp in {id(m.ramp): m.ramp for m in getattr(model, "_arbor_masks", [])}.values():
        for handle in ramp.handles:
            handle.remove()
    for module in model.modules():
        module.__dict__.pop("_arbor_masks", None)
    if not state or not state.get("masks"):
        return
    device = next(model.parameters()).device
    ramps = [_Ramp(int(saved["steps"]), int(saved["done"]), device) for saved in state["ramps"]]
    masks = [_Mask(model.get_submodule(m["module"]), m["side"], None if m["index"] is None else m["index"].to(device),
                   ramps[m["ramp"]], None) for m in state["masks"]]
    if not hasattr(model, "_arbor_mask_hook"):
        model._arbor_mask_hook = model.register_forward_pre_hook(lambda m, args, kwargs: _advance(m), with_kwargs=True)
    model._arbor_masks = masks


def remap_masks(model, event) -> None:
    """Follow masked positions when a later growth step permutes units (head growth does).

    Called from the ``arbor_grow_width`` hook, and earlier from an init scheme
    of this module that needs current positions; each mask follows an event once.
    """
    for mask in getattr(model, "_arbor_masks", []):
        if mask.index is None or mask.created_by() is event or mask.followed() is event:
            continue
        mask.followed = weakref.ref(event)
        weight = getattr(mask.module, "weight", None)
        for info in event.resized.values():
            if info.new_param is weight:
                positions = info.old_positions.get(mask.weight_dim())
                if positions is not None:
                    mask.index = positions.to(mask.index.device)[mask.index]


class MaskedInit(InitScheme):
    description = "new parts random but masked, the mask ramps 0 -> 1 over ramp_steps training forwards (MSG, exact)"
    exact = True
    Settings = MaskedSettings

    def initialize(self, model, event, settings: MaskedSettings) -> None:
        remap_masks(model, event)  # earlier masks first, so this step's new masks are not remapped
        ramp = _Ramp(settings.ramp_steps, device=next(model.parameters()).device)
        masks: list[_Mask] = []
        std = _std(model)
        params = _params(model)
        layers = model.model.layers

        def outgoing(name: str, dim: int, new: torch.Tensor) -> None:
            # Whatever the new parts write is masked, so they may start random (MSG's point).
            w = params[name]
            w.index_copy_(dim, new, torch.randn_like(w.index_select(dim, new)) * std)

        if event.axis == "depth":
            for i in event.layers:
                for proj in (layers[i].self_attn.o_proj, layers[i].mlp.down_proj):
                    proj.weight.normal_(0.0, std)
                    masks.append(_Mask(proj, "in", None, ramp, event))
        elif event.axis == "ffn":
            for i in event.layers:
                name = f"model.layers.{i}.mlp.down_proj.weight"
                old = event.resized[name].old_shape[1]
                new = torch.arange(old, params[name].shape[1], device=params[name].device)
                outgoing(name, 1, new)
                masks.append(_Mask(layers[i].mlp.down_proj, "in", new, ramp, event))
        elif event.axis == "heads":
            for i in event.layers:
                name = f"model.layers.{i}.self_attn.o_proj.weight"
                info = event.resized[name]
                keep = torch.zeros(info.new_shape[1], dtype=torch.bool)
                keep[info.old_positions[1].cpu()] = True
                new = (~keep).nonzero().view(-1).to(params[name].device)
                outgoing(name, 1, new)
                masks.append(_Mask(layers[i].self_attn.o_proj, "in", new, ramp, event))
        elif event.resized:  # hidden: new residual dimensions
            d_old, d_new = event.resized["model.norm.weight"].old_shape[0], model.config.hidden_size
            new = torch.arange(d_old, d_new, device=next(model.parameters()).device)
            if "model.embed_tokens.weight" in event.resized:
                outgoing("model.embed_tokens.weight", 1, new)
            masks.append(_Mask(model.model.embed_tokens, "out", new, ramp, event))
            for i, layer in enumerate(layers):
                for proj, name in ((layer.self_attn.o_proj, "self_attn.o_proj"), (layer.mlp.down_proj, "mlp.down_proj")):
                    outgoing(f"model.layers.{i}.{name}.weight", 0, new)
                    masks.append(_Mask(proj, "out", new, ramp, event))
        if not masks:
            return
        if not hasattr(model, "_arbor_mask_hook"):
            model._arbor_mask_hook = model.register_forward_pre_hook(lambda m, args, kwargs: _advance(m),
                                                                     with_kwargs=True)
        model._arbor_masks = [*getattr(model, "_arbor_masks", []), *masks]


# ---------------------------------------------------------------------- depth
def _copy_layer(model, event, dst: int, src: int, noise_std: float) -> None:
    """Make new layer ``dst`` a copy of ``src``, sizes included (it may be wider than the defaults)."""
    config = model.config
    for name in ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads"):
        getattr(config, name)[dst] = getattr(config, name)[src]
    layer = copy.deepcopy(model.model.layers[src])
    layer.self_attn.layer_idx = dst
    for module in layer.modules():
        # A copied mask hook still points at the source's mask, so the copy ramps with it; only the
        # bookkeeping list must not be duplicated (its copies would never advance).
        module.__dict__.pop("_arbor_masks", None)
    if noise_std > 0:
        for p in layer.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * noise_std)
    model.model.layers[dst] = layer
    for name, p in layer.named_parameters():
        event.new_shapes[f"model.layers.{dst}.{name}"] = tuple(p.shape)


def _old_layers(model, event) -> list[int]:
    new = set(event.layers)
    return [i for i in range(model.config.num_hidden_layers) if i not in new]


class CopySettings(StrictSettings):
    #: Std of noise added to every copied weight matrix (0: exact copies).
    noise_std: float = Field(0.0, ge=0.0)


class CopyNeighborInit(InitScheme):
    description = "a new layer copies its nearest old layer, plus optional noise (the Arbor seed; not exact)"
    exact = False
    axes = ("depth",)
    copies_layers = True
    Settings = CopySettings

    def initialize(self, model, event, settings: CopySettings) -> None:
        old = _old_layers(model, event)
        if not old:
            return
        for i in event.layers:
            before = [j for j in old if j < i]
            _copy_layer(model, event, i, before[-1] if before else min(old), settings.noise_std)


class StackInit(InitScheme):
    description = "new layers repeat the trained stack in order, appended by default (G_stack; not exact)"
    exact = False
    axes = ("depth",)
    copies_layers = True
    Settings = CopySettings

    def default_positions(self, model, num_layers: int) -> list[int]:
        return [model.config.num_hidden_layers] * num_layers

    def initialize(self, model, event, settings: CopySettings) -> None:
        old = _old_layers(model, event)
        if not old:
            return
        for k, i in enumerate(sorted(event.layers)):
            _copy_layer(model, event, i, old[k % len(old)], settings.noise_std)


INIT_SCHEMES = {
    "zero": ZeroInit(),
    "split": SplitInit(),
    "masked": MaskedInit(),
    "copy-neighbor": CopyNeighborInit(),
    "stack": StackInit(),
}
