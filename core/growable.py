"""The growth methods of `ArborForCausalLM`, and ``model.grow()``.

``grow_depth`` / ``grow_width`` / ``grow_heads`` / ``grow_hidden`` call the
operators of `arbor.growth` with an init scheme, then (when given an
optimizer) move its groups and state to the grown parameters with
`arbor.optim.carry_over`. ``grow()`` takes one step of the growth the config
names (``config.growth``, a `GrowthSpec`), with the init scheme and insertion
policy ``plugins.toml`` picks::

    model.config.growth = {"axis": "ffn", "factor": 1.5}
    event = model.grow(optimizer=opt, new_param_lr_multiplier=2.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from arbor.growth import (
    GrowthError,
    GrowthEvent,
    add_heads,
    following,
    insert_layers,
    rebind_optimizer,
    widen_hidden,
    widen_mlp,
)
from arbor.lora import merge_lora
from arbor_plugins.settings import describe_validation_error

__all__ = ["GrowableMixin", "GrowthSpec", "parse_growth_spec"]


class GrowthSpec(BaseModel):
    """One growth step, as ``config.growth`` (or a config file) describes it.

    ``axis`` picks the operator; the other fields say how much, relative to
    the model's current size so the same step can repeat:

    * ``depth``: ``num_layers`` new layers at ``positions`` or where ``policy`` says
      (default: the middle of the stack, Arbor's rule);
    * ``ffn``: every layer in ``layers`` (default all) to ``factor`` x or ``add`` + the widest one;
    * ``heads``: ``add`` query heads and ``add_kv`` kv heads to every layer in ``layers``;
    * ``hidden``: d_model to ``factor`` x or ``add`` + the current one.

    ``init`` / ``init_settings`` name the init scheme; without them the
    ``[init_scheme]`` of ``plugins.toml`` decides, and without that ``"zero"``.
    ``policy`` likewise falls back to ``[insertion_policy]``.
    """

    model_config = ConfigDict(extra="forbid")

    axis: Literal["depth", "ffn", "heads", "hidden"] = "depth"
    num_layers: int = Field(4, ge=1)
    positions: list[int] | None = None
    policy: str | None = None
    factor: float | None = Field(None, gt=1.0)
    add: int | None = Field(None, ge=1)
    add_kv: int = Field(0, ge=0)
    layers: list[int] | None = None
    init: str | None = None
    init_settings: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GrowthSpec:
        if self.axis in ("ffn", "hidden") and (self.factor is None) == (self.add is None):
            raise ValueError(f"axis {self.axis!r} needs exactly one of factor or add")
        if self.axis == "heads" and self.add is None and not self.add_kv:
            raise ValueError("axis 'heads' needs add (query heads) and/or add_kv")
        if self.axis == "depth" and self.positions is not None and self.policy is not None:
            raise ValueError("give positions or policy, not both")
        if self.positions is not None and len(self.positions) != self.num_layers:
            raise ValueError(f"positions has {len(self.positions)} entries but num_layers={self.num_layers}")
        return self


def parse_growth_spec(value: Any) -> GrowthSpec:
    """A `GrowthSpec` from a dict (or spec); errors are `GrowthError` naming the field."""
    if isinstance(value, GrowthSpec):
        return value
    try:
        return GrowthSpec.model_validate(value or {})
    except ValidationError as exc:
        raise GrowthError(describe_validation_error(exc, prefix="growth").replace("Value error, ", "")) from None


def _resolve_positions(model, num_layers: int, positions, policy, init) -> list[int]:
    n = model.config.num_hidden_layers
    if positions is not None and policy is not None:
        raise GrowthError("give positions or policy, not both")
    if positions is not None:
        positions = list(positions)
        if len(positions) != num_layers:
            raise GrowthError(f"positions={positions} has {len(positions)} entries but num_layers={num_layers}")
        return positions
    from arbor.plugins import get_registry

    registry = get_registry()
    if policy is not None:
        name, settings = (policy, None) if isinstance(policy, str) else policy
        try:
            component = registry.get("insertion_policy", name)
        except LookupError as exc:
            known = ", ".join(repr(k) for k in getattr(exc, "known", [])) or "none are installed"
            raise GrowthError(f"policy={name!r} is not a registered insertion policy; valid names: {known}") from None
        return list(component.positions(model, num_layers, component.validate_settings(settings)))
    if isinstance(init, str) and registry.has("init_scheme", init):
        preferred = registry.get("init_scheme", init).default_positions(model, num_layers)
        if preferred is not None:
            return list(preferred)
    return [n // 2] * num_layers  # Arbor's rule: the middle of the stack


class GrowableMixin:
    """Growth methods for a causal LM whose config is an `ArborConfig`.

    Every method grows the model in place, exactly with an exact ``init``
    (default ``"zero"``), fires the matching ``arbor_grow_*`` hook, moves the
    state of ``optimizer`` (and ``scheduler``) into the new shapes when given
    (``optim_kwargs`` go to `arbor.optim.carry_over`: ``new_param_lr_multiplier``,
    ``warmup_steps``), and returns the `GrowthEvent`.
    """

    def grow_depth(self, num_layers: int = 1, positions: list[int] | None = None, policy: str | None = None,
                   init: str = "zero", init_settings: dict | None = None, optimizer=None, scheduler=None,
                   **optim_kwargs) -> GrowthEvent:
        """Insert ``num_layers`` new layers at ``positions`` (indices into the current
        stack), where the insertion ``policy`` says, where the init scheme prefers
        (``stack`` appends), or else at the middle."""
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise GrowthError(f"num_layers={num_layers!r} is invalid: must be a positive integer")
        _check_optim(optimizer, optim_kwargs)
        positions = _resolve_positions(self, num_layers, positions, policy, init)
        with following(optimizer):
            event = insert_layers(self, positions, init=init, init_settings=init_settings)
        return self._carry(event, optimizer, scheduler, optim_kwargs)

    def grow_width(self, intermediate_size: int, layers=None, init: str = "zero", init_settings: dict | None = None,
                   optimizer=None, scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Widen the FFN of ``layers`` (default: all) to ``intermediate_size``."""
        _check_optim(optimizer, optim_kwargs)
        merge_lora(self, optimizer)  # resizing needs plain projections; merging changes nothing
        with following(optimizer):
            event = widen_mlp(self, intermediate_size, layers, init=init, init_settings=init_settings)
        return self._carry(event, optimizer, scheduler, optim_kwargs)

    def grow_heads(self, num_attention_heads: int, num_key_value_heads: int | None = None, layers=None,
                   init: str = "zero", init_settings: dict | None = None, optimizer=None, scheduler=None,
                   **optim_kwargs) -> GrowthEvent:
        """Give ``layers`` (default: all) more query and optionally kv heads."""
        _check_optim(optimizer, optim_kwargs)
        merge_lora(self, optimizer)  # resizing needs plain projections; merging changes nothing
        with following(optimizer):
            event = add_heads(self, num_attention_heads, num_key_value_heads, layers, init=init,
                              init_settings=init_settings)
        return self._carry(event, optimizer, scheduler, optim_kwargs)

    def grow_hidden(self, hidden_size: int, init: str = "zero", init_settings: dict | None = None, optimizer=None,
                    scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Widen the residual stream (d_model) to ``hidden_size``."""
        _check_optim(optimizer, optim_kwargs)
        merge_lora(self, optimizer)  # resizing needs plain projections; merging changes nothing
        with following(optimizer):
            event = widen_hidden(self, hidden_size, init=init, init_settings=init_settings)
        return self._carry(event, optimizer, scheduler, optim_kwargs)

    def grow(self, spec: dict | GrowthSpec | None = None, plugins: str | Path | Any = None, optimizer=None,
             scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Take one step of the growth ``spec`` (default: ``config.growth``) describes.

        ``plugins`` is a ``plugins.toml`` path or a loaded selection (default:
        ``./plugins.toml`` when present); its ``[init_scheme]`` and
        ``[insertion_policy]`` tables, with their settings, apply where the
        spec names none. With neither, the step is Arbor's: 4 new layers at
        the middle, zero-initialised (exact).
        """
        from arbor.plugins_toml import load_plugins_toml

        spec = parse_growth_spec(spec if spec is not None else getattr(self.config, "growth", None))
        selection = plugins if hasattr(plugins, "choices") else load_plugins_toml(plugins)
        init, init_settings = spec.init or "zero", spec.init_settings
        if spec.init is None and selection.name("init_scheme"):
            init, init_settings = selection.name("init_scheme"), selection.settings("init_scheme").model_dump()
        policy = spec.policy
        if policy is None and spec.positions is None and selection.name("insertion_policy"):
            policy = (selection.name("insertion_policy"), selection.settings("insertion_policy").model_dump())
        common = dict(init=init, init_settings=init_settings, optimizer=optimizer, scheduler=scheduler,
                      **optim_kwargs)
        config = self.config
        if spec.axis == "depth":
            event = self.grow_depth(spec.num_layers, positions=spec.positions, policy=policy, **common)
        elif spec.axis == "ffn":
            idx = spec.layers if spec.layers is not None else range(config.num_hidden_layers)
            widest = max(config.layer_intermediate_sizes[i] for i in _valid_layers(config, idx))
            target = round(widest * spec.factor) if spec.factor else widest + spec.add
            event = self.grow_width(target, layers=spec.layers, **common)
        elif spec.axis == "heads":
            idx = _valid_layers(config, spec.layers if spec.layers is not None else range(config.num_hidden_layers))
            q = {config.layer_num_attention_heads[i] for i in idx}
            kv = {config.layer_num_key_value_heads[i] for i in idx}
            if len(q) > 1 or len(kv) > 1:
                raise GrowthError(f"growth.layers={list(idx)} have different head counts ({sorted(q)} query, "
                                  f"{sorted(kv)} kv); a heads step adds the same count to layers of equal size")
            event = self.grow_heads(q.pop() + (spec.add or 0), kv.pop() + spec.add_kv, layers=spec.layers, **common)
        else:
            d = config.hidden_size
            event = self.grow_hidden(round(d * spec.factor) if spec.factor else d + spec.add, **common)
        event.reason = event.reason or f"grow({spec.model_dump(exclude_defaults=True)})"
        return event

    def _carry(self, event: GrowthEvent, optimizer, scheduler, optim_kwargs) -> GrowthEvent:
        if optimizer is not None:
            from arbor.optim import carry_over

            rebind_optimizer(optimizer, event)
            carry_over(optimizer, self, event, scheduler=scheduler, **optim_kwargs)
        return event


def _check_optim(optimizer, optim_kwargs) -> None:
    if optim_kwargs and optimizer is None:
        raise GrowthError(f"{', '.join(optim_kwargs)} only apply together with optimizer=")


def _valid_layers(config, layers) -> list[int]:
    n = config.num_hidden_layers
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise GrowthError(f"growth.layers={bad} is invalid: layer indices must lie in [0, {n - 1}]")
    return layers
