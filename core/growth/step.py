"""One growth step, from spec to record: the one path every growth takes.

``model.grow()``, ``model.grow_depth()`` and its siblings, `arbor.training.trainer.Trainer`,
`arbor.training.integrations.GrowthCallback` and ``arbor grow`` all build a `GrowthStep`
and call it; none of them resizes, initialises or touches the optimizer itself.
A step runs, in this order:

1. **resolve** the spec: the step asked for, else the entry point's default
   (``growth=``), else ``model.config.growth``, else `GrowthSpec`'s defaults
   (4 layers at the middle); the init scheme and insertion policy the spec
   names, else the entry point's (``init=``, ``insertion_policy=``), else
   ``plugins.toml``'s, else ``"zero"`` and the init scheme's preferred place
   or the middle of the stack;
2. turn it into an `Operation` (axis, absolute target, layers, positions);
3. merge LoRA adapters into the projections a width step resizes;
4. run the growth operator of `arbor.growth.operators`, which applies the init scheme
   and fires the ``arbor_grow_*`` hook;
5. carry the optimizer (and scheduler) over, exactly once (`arbor.growth.optim.carry_over`);
6. give inserted layers the gradient checkpointing the others have, and call the caller's
   ``prepare`` (a sharded run shards the new layers there: `arbor.training.sharding`);
7. apply the freeze policy;
8. measure the probe loss again and check an exact step kept it;
9. tell the trigger (``grew``);
10. return a `GrowthResult`: the `GrowthEvent` and the record logged to
    ``metrics.jsonl`` / ``state.log_history``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arbor.compat import GradientCheckpointingLayer, copy_checkpointing
from arbor.growth.lora import merge_lora
from arbor.growth.operators import (
    add_heads,
    following,
    insert_layers,
    widen_hidden,
    widen_mlp,
)
from arbor.growth.optim import carry_over
from arbor.plugins import get_registry
from arbor.plugins.selection import load_plugins_toml
from arbor_plugins import DEFAULTS
from arbor_plugins.growth import GrowthError, GrowthEvent, GrowthSpec, parse_growth_spec

__all__ = ["GrowthResult", "GrowthSpec", "GrowthStep", "Operation", "describe_growth", "parse_growth_spec",
           "resolve_positions"]


def resolve_positions(model, num_layers: int, positions=None, policy=None, init=None) -> list[int]:
    """Where ``num_layers`` new layers go: ``positions``, else where the insertion ``policy``
    (a name or ``(name, settings)``) says, else where the init scheme prefers, else the middle."""
    n = model.config.num_hidden_layers
    if positions is not None and policy is not None:
        raise GrowthError("give positions or policy, not both")
    if positions is not None:
        positions = list(positions)
        if len(positions) != num_layers:
            raise GrowthError(f"positions={positions} has {len(positions)} entries but num_layers={num_layers}")
        return positions

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


@dataclass
class Operation:
    """A resolved step: what the operator of ``axis`` is called with.

    ``target`` is absolute (layers to insert, FFN width, query heads, d_model);
    ``kv_target`` is the kv-head count of a heads step (None keeps it).
    """

    axis: str
    target: int
    layers: list[int] | None = None
    positions: list[int] | None = None
    policy: Any = None  # a name, or (name, settings)
    kv_target: int | None = None
    init: Any = DEFAULTS["init_scheme"]
    init_settings: dict | None = None


@dataclass
class GrowthResult:
    """What a step did: the operator's `GrowthEvent` and the JSON-friendly record."""

    event: GrowthEvent
    record: dict[str, Any]


class GrowthStep:
    """The settings of a run's growth steps; calling it takes one step.

    * ``plugins``: a ``plugins.toml`` path or a loaded selection (default
      ``./plugins.toml`` when present); its ``[init_scheme]`` and
      ``[insertion_policy]`` apply where neither the spec nor ``init`` /
      ``insertion_policy`` name one.
    * ``growth``: the step to take when the caller gives none (a `GrowthSpec`
      or dict); default ``model.config.growth``, else `GrowthSpec`'s defaults.
    * ``freeze_policy`` / ``freeze_settings``: a registered freeze policy
      (the component) and its validated settings, applied after each step.
    * ``new_param_lr_multiplier`` / ``warmup_steps``: the new parameters' optimizer group.
    * ``exact_tolerance``: the relative probe-loss change above which a step
      whose init claims exactness is recorded as not exact.
    """

    def __init__(self, *, plugins: Any = None, growth: dict | GrowthSpec | None = None, init: str | None = None,
                 insertion_policy: str | None = None, freeze_policy: Any = None, freeze_settings: Any = None,
                 new_param_lr_multiplier: float = 1.0, warmup_steps: int = 0, exact_tolerance: float = 1e-4):
        self.selection = plugins if hasattr(plugins, "choices") else load_plugins_toml(plugins)
        self.growth = None if growth is None else parse_growth_spec(growth)
        self.init, self.insertion_policy = init, insertion_policy
        self.freeze_policy, self.freeze_settings = freeze_policy, freeze_settings
        self.optim_kwargs = {"new_param_lr_multiplier": float(new_param_lr_multiplier),
                             "warmup_steps": int(warmup_steps)}
        self.exact_tolerance = float(exact_tolerance)

    # ------------------------------------------------------------ resolving
    def resolve(self, model, spec: dict | GrowthSpec | None = None) -> GrowthSpec:
        """The spec this step takes, with the init scheme and insertion policy filled in where chosen."""
        if spec is not None:
            spec = parse_growth_spec(spec)
        elif self.growth is not None:
            spec = self.growth
        else:
            spec = parse_growth_spec(getattr(model.config, "growth", None))
        fill: dict[str, Any] = {}
        if spec.init is None:
            if self.init is not None:
                fill["init"] = self.init
            elif self.selection.name("init_scheme"):
                fill["init"] = self.selection.name("init_scheme")
                fill["init_settings"] = self.selection.settings("init_scheme").model_dump()
        if spec.axis == "depth" and spec.policy is None and spec.positions is None:
            if self.insertion_policy is not None:
                fill["policy"] = self.insertion_policy
            elif self.selection.name("insertion_policy"):
                fill["policy"] = self.selection.name("insertion_policy")
                fill["policy_settings"] = self.selection.settings("insertion_policy").model_dump()
        # Validated again, so the record shows the filled fields as set.
        return GrowthSpec.model_validate({**spec.model_dump(exclude_unset=True), **fill}) if fill else spec

    @staticmethod
    def operation(model, spec: GrowthSpec) -> Operation:
        """The absolute `Operation` a relative spec asks of ``model`` now."""
        config = model.config
        init = spec.init or DEFAULTS["init_scheme"]
        common = dict(init=init, init_settings=spec.init_settings)
        if spec.axis == "depth":
            policy = spec.policy if spec.policy_settings is None else (spec.policy, spec.policy_settings)
            return Operation("depth", spec.num_layers, positions=spec.positions, policy=policy, **common)
        if spec.axis in ("ffn", "heads") and config.num_hidden_layers == 0:
            raise GrowthError(f"growth.axis={spec.axis!r} widens existing layers, but the model has "
                              "num_hidden_layers=0; grow depth first")
        if spec.axis == "ffn":
            idx = _valid_layers(config, spec.layers if spec.layers is not None else range(config.num_hidden_layers))
            widest = max(config.layer_intermediate_sizes[i] for i in idx)
            target = round(widest * spec.factor) if spec.factor else widest + spec.add
            return Operation("ffn", target, layers=spec.layers, **common)
        if spec.axis == "heads":
            idx = _valid_layers(config, spec.layers if spec.layers is not None else range(config.num_hidden_layers))
            q = {config.layer_num_attention_heads[i] for i in idx}
            kv = {config.layer_num_key_value_heads[i] for i in idx}
            if len(q) > 1 or len(kv) > 1:
                raise GrowthError(f"growth.layers={list(idx)} have different head counts ({sorted(q)} query, "
                                  f"{sorted(kv)} kv); a heads step adds the same count to layers of equal size")
            return Operation("heads", q.pop() + (spec.add or 0), layers=spec.layers, kv_target=kv.pop() + spec.add_kv,
                             **common)
        d = config.hidden_size
        return Operation("hidden", round(d * spec.factor) if spec.factor else d + spec.add, **common)

    # -------------------------------------------------------------- growing
    def __call__(self, model, spec: dict | GrowthSpec | Operation | None = None, *, optimizer=None, scheduler=None,
                 probe: Callable[[], float | None] | None = None, reason: str | None = None, step: int | None = None,
                 tokens: int | None = None, trigger=None, trigger_name: str | None = None,
                 prepare: Callable[[Any, GrowthEvent], None] | None = None) -> GrowthResult:
        """Take one step of ``spec`` (or an `Operation`) on ``model``; see the module doc for the order.

        ``trigger`` is told ``grew``; ``trigger_name``, when given, goes into the record as ``"trigger"``.
        ``prepare(model, event)`` runs once the model has grown and the optimizer holds the new
        parameters, before the freeze policy and the second probe.
        """
        if isinstance(spec, Operation):
            resolved, op = None, spec
        else:
            resolved = self.resolve(model, spec)
            op = self.operation(model, resolved)
        params_before, layers_before = _count(model), model.config.num_hidden_layers
        before = probe() if probe is not None else None
        started = time.perf_counter()
        event = self._operate(model, op, optimizer)
        if optimizer is not None:
            carry_over(optimizer, model, event, scheduler=scheduler, **self.optim_kwargs)
        seconds = time.perf_counter() - started
        if reason is None and resolved is not None:
            reason = f"grow({resolved.model_dump(exclude_defaults=True)})"
        event.reason = reason or ""
        _checkpoint_new_layers(model)
        if prepare is not None:
            prepare(model, event)
        frozen = []
        if self.freeze_policy is not None:
            frozen = self.freeze_policy.apply(model, event, self.freeze_settings, optimizer=optimizer)
        after = probe() if probe is not None else None
        if trigger is not None:
            trigger.grew(step, tokens, model, event)
        summary = event.summary()
        summary.pop("resized", None)
        summary.pop("positions")  # a record's "positions" are the new layers' indices (event.layers)
        positions = summary.pop("layers")
        record = {"event": "growth", "step": step, "tokens": tokens,
                  "spec": resolved.model_dump(exclude_unset=True) if resolved is not None else vars(op).copy(),
                  **summary, "positions": positions, "loss_before": before, "loss_after": after, "seconds": seconds,
                  "params_before": params_before, "params": _count(model), "layers_before": layers_before,
                  "layers": model.config.num_hidden_layers, "frozen": len(frozen),
                  "param_groups": len(optimizer.param_groups) if optimizer is not None else None}
        if trigger_name is not None:
            record["trigger"] = trigger_name
        if event.exact and before is not None and not self.same_loss(before, after):
            record["exact"], record["claimed_exact"] = False, True  # the probe contradicts the init scheme
        return GrowthResult(event, record)

    def same_loss(self, before: float, after: float) -> bool:
        return abs(after - before) <= self.exact_tolerance * max(1.0, abs(before))

    @staticmethod
    def _operate(model, op: Operation, optimizer) -> GrowthEvent:
        if op.axis != "depth":
            merge_lora(model, optimizer)  # resizing needs plain projections; merging changes nothing
        with following(optimizer):
            if op.axis == "depth":
                positions = resolve_positions(model, op.target, op.positions, op.policy, op.init)
                return insert_layers(model, positions, init=op.init, init_settings=op.init_settings)
            if op.axis == "ffn":
                return widen_mlp(model, op.target, op.layers, init=op.init, init_settings=op.init_settings)
            if op.axis == "heads":
                return add_heads(model, op.target, op.kv_target, op.layers, init=op.init,
                                 init_settings=op.init_settings)
            if op.axis == "hidden":
                return widen_hidden(model, op.target, init=op.init, init_settings=op.init_settings)
        raise GrowthError(f"axis={op.axis!r} is invalid: must be depth, ffn, heads or hidden")


def describe_growth(record: dict[str, Any]) -> str:
    """The one-line message every entry point prints for a growth record."""
    exact = "exact" if record["exact"] else "not exact"
    probe = "" if record["loss_before"] is None else \
        f"; probe loss {record['loss_before']:.4f} -> {record['loss_after']:.4f}"
    line = (f"grew {record['axis']} ({record['init']}, {exact}): {record['params_before']:,} -> "
            f"{record['params']:,} params, {record['layers_before']} -> {record['layers']} layers{probe}")
    if record.get("reason"):
        line += f"; because {record['reason']}"
    return line if record.get("step") is None else f"step {record['step']}: {line}"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _valid_layers(config, layers) -> list[int]:
    n = config.num_hidden_layers
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise GrowthError(f"growth.layers={bad} is invalid: layer indices must lie in [0, {n - 1}]")
    return layers


def _checkpoint_new_layers(model) -> None:
    """Give inserted layers the gradient checkpointing switched on for the others.

    ``gradient_checkpointing_enable`` flags the layers that exist when it runs;
    a layer inserted later would otherwise keep every activation.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    on = next((m for m in layers if m.gradient_checkpointing), None)
    if on is not None:
        copy_checkpointing(on, [m for m in layers if not m.gradient_checkpointing])
