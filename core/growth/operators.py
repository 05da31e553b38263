"""Growth operators: make an `ArborForCausalLM` deeper or wider, in place and exactly.

Each operator resizes the modules it touches (no copy of the whole model),
updates the config so `save_pretrained` writes the grown architecture, and
returns a `GrowthEvent` describing what changed. New parts start so the model
computes the same function as before (the "zero" scheme, Gesmundo & Maile
2023): whatever reads a new unit may start random, whatever a new unit writes
into the residual stream starts at zero.

Every operator takes ``init=``: the name of a registered init scheme (or a
scheme object) that rewrites the new parts after the zero construction and
before the ``arbor_grow_*`` hooks fire, so listeners see the final weights.

A resized tensor becomes a new `nn.Parameter` (autograd remembers the shape of
a leaf it has seen); `arbor.growth.optim.carry_over` moves an optimizer's groups and
state to the new objects, using `GrowthEvent.resized`.
The model methods (``model.grow_depth`` and friends) live in `arbor.growth.growable`.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from arbor import compat
from arbor.growth.optim import hand_over
from arbor.plugins import call_hook, get_registry
from arbor_plugins.growth import AXES, GrowthError, GrowthEvent, ResizedParameter
from arbor_plugins.settings import describe_validation_error

__all__ = ["AXES", "GrowthError", "GrowthEvent", "ResizedParameter", "add_heads", "following", "insert_layers",
           "resolve_init", "widen_hidden", "widen_mlp"]


# ----------------------------------------------------------------- primitives
def _std(model) -> float:
    return float(model.config.initializer_range)


def _grow_tensor(
    module: nn.Module, attr: str, new_shape: tuple[int, ...], old_positions: dict[int, torch.Tensor], fill
) -> ResizedParameter:
    """Replace parameter ``module.<attr>`` by a ``new_shape`` one holding the old values at ``old_positions``.

    ``fill(tensor)`` initialises the whole new tensor first; the old values
    are then written over it, so ``fill`` decides only what the new parts hold.
    The parameter is a new object: autograd remembers the shape of a leaf it
    has seen, so resizing ``.data`` in place breaks the next backward pass.
    `arbor.growth.optim.carry_over` points an optimizer at the new objects.
    """
    param: nn.Parameter = getattr(module, attr)
    old = param.data
    info = ResizedParameter(tuple(old.shape), tuple(new_shape), old_positions)
    new = torch.empty(new_shape, dtype=old.dtype, device=old.device)
    fill(new)
    new[info.old_index()] = old
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    setattr(module, attr, replacement)
    info.old_param = weakref.ref(param)
    info.new_param = replacement
    optimizer = _OPTIMIZER.get()
    if optimizer is not None:  # hand over now, so the old tensor and its state are freed as we go
        hand_over(optimizer, param, replacement, info)
    return info


#: The optimizer of the growth step in progress (set by `following`): resized parameters are
#: handed over to it one by one, which keeps peak memory near the size of what is added.
_OPTIMIZER: ContextVar[Any] = ContextVar("arbor_growth_optimizer", default=None)


@contextmanager
def following(optimizer):
    """Within this block, growth operators move ``optimizer``'s groups and state to each resized
    parameter as soon as it is replaced. `arbor.growth.optim.carry_over` still runs afterwards for the
    rest (moment scales, new layers' param group, frozen parameters)."""
    token = _OPTIMIZER.set(optimizer)
    try:
        yield optimizer
    finally:
        _OPTIMIZER.reset(token)


def _normal(std: float):
    return lambda t: t.normal_(0.0, std)


def _zeros(t: torch.Tensor) -> torch.Tensor:
    return t.zero_()


def _set_linear_shape(linear: nn.Linear) -> None:
    linear.out_features, linear.in_features = linear.weight.shape


def _record(event: GrowthEvent, name: str, info: ResizedParameter) -> None:
    event.resized[name] = info
    event.old_shapes[name] = info.old_shape
    event.new_shapes[name] = info.new_shape


def resolve_init(init: Any, axis: str, settings: dict | None = None) -> tuple[str, Any, Any]:
    """``(name, scheme, validated settings)`` for ``init``, checked before anything is resized.

    ``"zero"`` is what the operators build themselves, so it works even with no
    strategies installed; any other name is looked up among registered init
    schemes. An object with an ``initialize`` method is used as it is.
    """
    if isinstance(init, str):
        name = init
        registry = get_registry()
        if name == "zero" and not registry.has("init_scheme", name):
            return name, None, None
        try:
            scheme = registry.get("init_scheme", name)
        except LookupError as exc:
            known = ", ".join(repr(n) for n in getattr(exc, "known", [])) or "none are installed"
            raise GrowthError(f"init={name!r} is not a registered init scheme; valid names: {known}") from None
    elif callable(getattr(init, "initialize", None)):
        scheme, name = init, getattr(init, "name", type(init).__name__)
    else:
        raise GrowthError(f"init={init!r} is invalid: give the name of an init scheme or an object with initialize()")
    axes = tuple(getattr(scheme, "axes", AXES))
    if axis not in axes:
        raise GrowthError(f"init={name!r} cannot initialise {axis} growth; it supports: {', '.join(axes)}")
    validate = getattr(scheme, "validate_settings", None)
    try:
        parsed = validate(settings) if validate else settings
    except ValidationError as exc:
        raise GrowthError(f"init_settings are invalid: {describe_validation_error(exc, prefix=name)}") from None
    return name, scheme, parsed


def _fire(model, event: GrowthEvent, init: tuple[str, Any, Any] = ("zero", None, None)) -> GrowthEvent:
    model.config.validate_arbor()
    name, scheme, settings = init
    event.init = name
    if scheme is not None:
        event.exact = bool(getattr(scheme, "exact", False))
        with torch.no_grad():
            scheme.initialize(model, event, settings)
    hook = "arbor_grow_depth" if event.axis == "depth" else "arbor_grow_width"
    call_hook(hook, model=model, event=event)
    return event


def _layer_list(model, layers, axis: str) -> list[int]:
    n = model.config.num_hidden_layers
    if n == 0:  # otherwise "all layers" would be none, and the step would grow nothing without a word
        raise GrowthError(f"axis={axis!r} widens existing layers, but the model has num_hidden_layers=0; "
                          "grow depth first")
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise GrowthError(f"layers={bad} is invalid: layer indices must lie in [0, {n - 1}]")
    return sorted(set(layers))


# ---------------------------------------------------------------------- depth
def insert_layers(model, positions: list[int], *, init: Any = "zero", init_settings: dict | None = None) -> GrowthEvent:
    """Insert one new decoder layer before old layer ``p`` for each ``p`` in ``positions``.

    ``positions`` index the current stack (``len(layers)`` appends); repeated
    positions insert several layers there. New layers get the config's default
    sizes and zero attention-output and MLP-output weights, so each starts as
    the identity on the residual stream.
    """
    scheme = resolve_init(init, "depth", init_settings)
    config = model.config
    stack: nn.ModuleList = model.model.layers
    n = len(stack)
    positions = sorted(positions)
    if not positions:
        raise GrowthError("positions is empty: give at least one insertion position")
    bad = [p for p in positions if not isinstance(p, int) or not 0 <= p <= n]
    if bad:
        raise GrowthError(f"positions={bad} is invalid: insertion positions must lie in [0, {n}]")
    if config.max_layers is not None and n + len(positions) > config.max_layers:
        raise GrowthError(
            f"inserting {len(positions)} layers into {n} exceeds max_layers={config.max_layers}"
        )
    if n == 0 and getattr(scheme[1], "copies_layers", False):
        raise GrowthError(f"init={scheme[0]!r} builds new layers from existing ones, but the model has "
                          "num_hidden_layers=0; grow from no layers with an init that needs none, e.g. 'zero'")
    old_names = {id(p): name for name, p in model.named_parameters()}
    first = stack[0] if n else None
    new_layers: list[nn.Module] = []
    layers: list[nn.Module] = []
    sizes = (config.layer_intermediate_sizes, config.layer_num_attention_heads, config.layer_num_key_value_heads,
             config.layer_generations)
    generation = max(config.layer_generations, default=0) + 1
    new_sizes: tuple[list[int], ...] = ([], [], [], [])
    new_indices: list[int] = []
    pi = 0
    for old_index in range(n + 1):
        while pi < len(positions) and positions[pi] == old_index:
            new_indices.append(len(layers))
            for target, default in zip(new_sizes, (config.intermediate_size, config.num_attention_heads,
                                                   config.num_key_value_heads, generation)):
                target.append(default)
            layers.append(None)  # placeholder, built once the config lists are final
            pi += 1
        if old_index < n:
            for target, source in zip(new_sizes, sizes):
                target.append(source[old_index])
            layers.append(stack[old_index])
    config.num_hidden_layers = len(layers)
    (config.layer_intermediate_sizes, config.layer_num_attention_heads, config.layer_num_key_value_heads,
     config.layer_generations) = (list(s) for s in new_sizes)
    ref = next(model.parameters())
    for i in new_indices:
        layer = model.model.layer_class(config, i).to(device=ref.device, dtype=ref.dtype)
        layer.apply(model._init_weights)
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        layers[i] = layer
        new_layers.append(layer)
    for layer in new_layers:  # a trainable stack (or model, when it has no layers) gets trainable new layers
        layer.train(first.training if first is not None else model.training)
    if first is not None:
        compat.copy_checkpointing(first, new_layers)  # and checkpointing, when the stack has it
    model.model.layers = nn.ModuleList(layers)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    event = GrowthEvent(axis="depth", layers=new_indices, positions=positions)
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") and int(name.split(".")[2]) in new_indices:
            event.new_parameters.append(name)
            event.new_shapes[name] = tuple(p.shape)
        elif id(p) in old_names and old_names[id(p)] != name:
            event.renamed[old_names[id(p)]] = name
    return _fire(model, event, scheme)


# ------------------------------------------------------------------------ ffn
def widen_mlp(model, intermediate_size: int, layers=None, *, init: Any = "zero",
              init_settings: dict | None = None) -> GrowthEvent:
    """Widen the FFN of ``layers`` (default: all) to ``intermediate_size`` units.

    New units read the input with random gate/up rows and write nothing: their
    down-projection columns start at zero.
    """
    scheme = resolve_init(init, "ffn", init_settings)
    config = model.config
    idx = _layer_list(model, layers, "ffn")
    if not isinstance(intermediate_size, int) or intermediate_size < 1:
        raise GrowthError(f"intermediate_size={intermediate_size!r} is invalid: must be a positive integer")
    too_wide = [i for i in idx if config.layer_intermediate_sizes[i] > intermediate_size]
    if too_wide:
        raise GrowthError(
            f"intermediate_size={intermediate_size} would shrink layers {too_wide} "
            f"(widths {[config.layer_intermediate_sizes[i] for i in too_wide]}); growth never removes units"
        )
    event = GrowthEvent(axis="ffn", layers=[])
    std = _std(model)
    for i in idx:
        mlp = model.model.layers[i].mlp
        old = mlp.intermediate_size
        if old == intermediate_size:
            continue
        prefix = f"model.layers.{i}.mlp."
        with torch.no_grad():
            for proj in (mlp.gate_proj, mlp.up_proj):
                info = _grow_tensor(proj, "weight", (intermediate_size, config.hidden_size), {}, _normal(std))
                _record(event, prefix + ("gate_proj" if proj is mlp.gate_proj else "up_proj") + ".weight", info)
                _set_linear_shape(proj)
            info = _grow_tensor(mlp.down_proj, "weight", (config.hidden_size, intermediate_size), {}, _zeros)
            _record(event, prefix + "down_proj.weight", info)
            _set_linear_shape(mlp.down_proj)
        mlp.intermediate_size = intermediate_size
        config.layer_intermediate_sizes[i] = intermediate_size
        event.layers.append(i)
    if layers is None:
        record_all_layers(config, "ffn", intermediate_size)
    return _fire(model, event, scheme)


def record_all_layers(config, axis: str, target: int, kv_target: int | None = None) -> None:
    """Raise the config's model-wide width to what an all-layers ``ffn`` or ``heads`` step grew every
    layer to (``intermediate_size``, or ``num_attention_heads`` and ``num_key_value_heads``); the
    per-layer lists hold each layer's own. A KV count that no longer divides the query count falls
    to their greatest common divisor."""
    if axis == "ffn":
        config.intermediate_size = max(config.intermediate_size, target)
        return
    config.num_attention_heads = max(config.num_attention_heads, target)
    if kv_target is not None:
        config.num_key_value_heads = max(config.num_key_value_heads, kv_target)
    if config.num_attention_heads % config.num_key_value_heads:
        config.num_key_value_heads = math.gcd(config.num_attention_heads, config.num_key_value_heads)


# ---------------------------------------------------------------------- heads
def add_heads(model, num_attention_heads: int, num_key_value_heads: int | None = None, layers=None, *,
              init: Any = "zero", init_settings: dict | None = None) -> GrowthEvent:
    """Give ``layers`` (default: all) ``num_attention_heads`` query and ``num_key_value_heads`` kv heads.

    Grouped-query attention maps query head ``h`` to kv head ``h // group``.
    Old query heads are moved to the slots of the grown layout that map to
    their old kv head (query rows and output columns permuted together, which
    changes nothing), new kv heads are appended, and new query heads fill the
    free slots with zero output columns. The group size may grow, never shrink.
    """
    scheme = resolve_init(init, "heads", init_settings)
    config = model.config
    idx = _layer_list(model, layers, "heads")
    event = GrowthEvent(axis="heads", layers=[])
    std = _std(model)
    hd = config.head_dim
    plan = []
    for i in idx:  # check every layer before touching any, so an error leaves the model as it was
        attn = model.model.layers[i].self_attn
        q_old, kv_old = attn.num_heads, attn.num_key_value_heads
        q_new = num_attention_heads
        kv_new = kv_old if num_key_value_heads is None else num_key_value_heads
        if not all(isinstance(v, int) and v >= 1 for v in (q_new, kv_new)):
            raise GrowthError(f"num_attention_heads={q_new!r}, num_key_value_heads={kv_new!r} must be positive integers")
        if q_new < q_old or kv_new < kv_old:
            raise GrowthError(
                f"num_attention_heads={q_new}, num_key_value_heads={kv_new} would shrink layer {i} "
                f"(now {q_old} and {kv_old}); growth never removes heads"
            )
        if q_new % kv_new:
            raise GrowthError(f"num_key_value_heads={kv_new} must divide num_attention_heads={q_new} (layer {i})")
        g_old, g_new = q_old // kv_old, q_new // kv_new
        if g_new < g_old:
            raise GrowthError(
                f"layer {i}: {q_new} query heads over {kv_new} kv heads is {g_new} per group, fewer than the "
                f"{g_old} per group now; old query heads could not keep their kv head. Allowed: "
                f"num_attention_heads >= {g_old} * num_key_value_heads"
            )
        if (q_new, kv_new) != (q_old, kv_old):
            plan.append((i, attn, q_old, kv_old, q_new, kv_new, g_old, g_new))
    for i, attn, q_old, kv_old, q_new, kv_new, g_old, g_new in plan:
        device = attn.q_proj.weight.device
        # Slot of old head h in the new layout: same kv head, same rank within its group.
        heads = torch.arange(q_old, device=device)
        slots = (heads // g_old) * g_new + heads % g_old
        rows = (slots[:, None] * hd + torch.arange(hd, device=device)).reshape(-1)
        prefix = f"model.layers.{i}.self_attn."
        h = config.hidden_size
        with torch.no_grad():
            _record(event, prefix + "q_proj.weight",
                    _grow_tensor(attn.q_proj, "weight", (q_new * hd, h), {0: rows}, _normal(std)))
            _record(event, prefix + "o_proj.weight",
                    _grow_tensor(attn.o_proj, "weight", (h, q_new * hd), {1: rows}, _zeros))
            for name, proj in (("k_proj", attn.k_proj), ("v_proj", attn.v_proj)):
                if kv_new != kv_old:
                    _record(event, prefix + name + ".weight",
                            _grow_tensor(proj, "weight", (kv_new * hd, h), {}, _normal(std)))
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                _set_linear_shape(proj)
        attn.num_heads, attn.num_key_value_heads = q_new, kv_new
        attn.num_key_value_groups = g_new
        config.layer_num_attention_heads[i] = q_new
        config.layer_num_key_value_heads[i] = kv_new
        event.layers.append(i)
    if layers is None:
        record_all_layers(config, "heads", num_attention_heads, num_key_value_heads)
    return _fire(model, event, scheme)


# --------------------------------------------------------------------- hidden
def widen_hidden(model, hidden_size: int, *, init: Any = "zero", init_settings: dict | None = None) -> GrowthEvent:
    """Grow the residual stream (d_model) to ``hidden_size``.

    New residual dimensions start at zero everywhere: zero embedding columns
    and zero rows in every projection that writes the stream. Projections that
    read it get random new columns (they read zeros for now). RMSNorm would
    see its mean square shrink by ``d_old / d_new``; scaling every gain by
    ``sqrt(d_old / d_new)`` and ``rms_norm_eps`` by ``d_old / d_new`` cancels
    that exactly, epsilon included.
    """
    scheme = resolve_init(init, "hidden", init_settings)
    config = model.config
    d_old, d_new = config.hidden_size, hidden_size
    if not isinstance(d_new, int) or d_new < d_old:
        raise GrowthError(f"hidden_size={hidden_size!r} is invalid: must be an integer >= the current {d_old}")
    if d_new == d_old:
        return _fire(model, GrowthEvent(axis="hidden", layers=[]), scheme)
    embed = model.model.embed_tokens
    if not isinstance(embed, nn.Embedding):
        grow = getattr(embed, "grow_hidden", None)
        if grow is None:
            raise GrowthError(
                f"substrate {config.substrate!r} cannot change its width: its module has no grow_hidden()"
            )
    event = GrowthEvent(axis="hidden", layers=list(range(config.num_hidden_layers)))
    std = _std(model)
    ratio = d_old / d_new

    tied = model.lm_head.weight is embed.weight

    def grow(name: str, module: nn.Module, shape, fill) -> None:
        _record(event, name, _grow_tensor(module, "weight", shape, {}, fill))

    with torch.no_grad():
        # The embedding first, while little else has grown: it is usually the largest tensor, and
        # its old and new copies coexist for a moment.
        if isinstance(embed, nn.Embedding):
            grow("model.embed_tokens.weight", embed, (embed.num_embeddings, d_new), _zeros)
            embed.embedding_dim = d_new
        else:
            embed.grow_hidden(d_new)
        if tied:  # re-tie at once, or the head would keep the old matrix alive until the end
            model.lm_head.weight = model.model.embed_tokens.weight
        norms = []
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            a, m = layer.self_attn, layer.mlp
            for name, proj in (("self_attn.q_proj", a.q_proj), ("self_attn.k_proj", a.k_proj),
                               ("self_attn.v_proj", a.v_proj), ("mlp.gate_proj", m.gate_proj),
                               ("mlp.up_proj", m.up_proj)):
                grow(p + name + ".weight", proj, (proj.out_features, d_new), _normal(std))
                _set_linear_shape(proj)
            for name, proj in (("self_attn.o_proj", a.o_proj), ("mlp.down_proj", m.down_proj)):
                grow(p + name + ".weight", proj, (d_new, proj.in_features), _zeros)
                _set_linear_shape(proj)
            norms += [(p + "input_layernorm", layer.input_layernorm),
                      (p + "post_attention_layernorm", layer.post_attention_layernorm)]
        norms.append(("model.norm", model.model.norm))
        for name, norm in norms:
            grow(name + ".weight", norm, (d_new,), lambda t: t.fill_(1.0))
            norm.weight.mul_(math.sqrt(ratio))
            norm.variance_epsilon = norm.variance_epsilon * ratio
        if not tied:
            grow("lm_head.weight", model.lm_head, (model.lm_head.out_features, d_new), _normal(std))
        _set_linear_shape(model.lm_head)
    config.hidden_size = d_new
    config.rms_norm_eps = config.rms_norm_eps * ratio
    return _fire(model, event, scheme)
