"""Checks of the growth components: init schemes, insertion policies, triggers, freeze policies."""

from __future__ import annotations

import json
import math
from typing import Any

from arbor_plugins.growth import parse_growth_spec
from arbor_plugins.testing._common import (
    ATOL,
    AXES,
    Report,
    TINY_CONFIGS,
    _Check,
    _diff,
    _greedy,
    _hooks,
    _inputs,
    _logits,
    _resolve,
    _save_load,
    _seeded,
    _settings,
    _shapes_fit_config,
    _train_steps,
    tiny_model,
)


# -------------------------------------------------------------- init schemes
def _grow_axis(model, axis: str, scheme, settings: dict | None, optimizer, check: _Check):
    config = model.config
    kw = dict(init=scheme, init_settings=settings, optimizer=optimizer)
    if axis == "depth":
        n = config.num_hidden_layers
        positions = scheme.default_positions(model, 2) if hasattr(scheme, "default_positions") else None
        if positions is not None:
            _check_positions(check, positions, n, 2, "default_positions(model, 2)")
        return model.grow_depth(2, positions=list(positions or [n // 2, n]), **kw)
    if axis == "ffn":
        return model.grow_width(max(config.layer_intermediate_sizes) + 8, **kw)
    if axis == "heads":
        q, kv = config.layer_num_attention_heads[0], config.layer_num_key_value_heads[0]
        # Grouped layouts grow their groups; one kv head per query head gains a whole group.
        return model.grow_heads(q + kv, kv, **kw) if q > kv else model.grow_heads(q + 1, kv + 1, **kw)
    return model.grow_hidden(config.hidden_size + 8, **kw)


def check_init_scheme(scheme: Any, axes: tuple[str, ...] | None = None, settings: dict[str, Any] | None = None,
                      configs: tuple[str, ...] | None = None) -> Report:
    """Grow tiny models on every axis ``scheme`` declares (or ``axes``) and check the contract.

    ``scheme`` is a registered name or an `InitScheme` object. A scheme that
    declares ``exact`` must keep the logits on every config, and the greedy
    continuation on one config per axis; a non-exact one only has its change
    reported (``report.max_logit_diff``). Every grown model's tensors must fit
    its config and train on. Save -> load runs on one config per axis, unless
    the scheme installed forward hooks (their effect is not in a checkpoint;
    the report notes the skip).
    """
    import torch

    name, scheme, _ = _resolve("init_scheme", scheme)
    check = _Check("init_scheme", name)
    declared = tuple(getattr(scheme, "axes", AXES))
    check(set(declared) <= set(AXES) and declared,
          f"axes={declared!r} is invalid: must be a non-empty subset of {AXES}")
    check(callable(getattr(scheme, "initialize", None)), "has no initialize(model, event, settings)")
    exact = getattr(scheme, "exact", False)
    check(isinstance(exact, bool), f"exact={exact!r} is invalid: must be True or False")
    check.report.exact = exact
    raw = settings if settings is not None else getattr(scheme, "example_settings", None)
    _settings(scheme, raw, check)  # fails early, with the settings named
    wanted = declared if axes is None else tuple(axes)
    unknown = set(wanted) - set(declared)
    check(not unknown, f"axes {sorted(unknown)} asked for, but the scheme declares only {declared}")
    configs = tuple(configs or TINY_CONFIGS)
    hooked = []
    for a, axis in enumerate(wanted):
        worst = 0.0
        for c, cfg in enumerate(configs):
            where = f"{axis} growth on {cfg}"
            # Greedy decoding and save/load cost most: one config per axis, a different one each axis.
            full = c == a % len(configs)
            model = tiny_model(cfg)
            ids, mask = _inputs(model.config.vocab_size)
            with _seeded(2):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                _train_steps(model, opt, ids)  # the optimizer has state to carry across the step
                before, hooks = _logits(model, ids, mask), _hooks(model)
                greedy = _greedy(model, ids) if full and exact else None
                with check.calling(where):
                    event = _grow_axis(model, axis, scheme, raw, opt, check)
                check(event.exact == exact, f"{where}: the event says exact={event.exact}, the scheme {exact}")
                diff, bound = _diff(before, _logits(model, ids, mask))
                worst = max(worst, diff)
                if exact:
                    check(diff <= bound,
                          f"{where}: declared exact but the logits changed by {diff:.3g} (> {bound:.3g})")
                if greedy is not None:
                    after = _greedy(model, ids)
                    check(after == greedy, f"{where}: declared exact but the greedy continuation changed: "
                                           f"{greedy} -> {after}")
                _shapes_fit_config(check, model)
                if full and _hooks(model) - hooks:
                    hooked.append(axis)
                elif full:
                    _save_load(check, model, ids, mask, where)
                loss = _train_steps(model, opt, ids)
                check(math.isfinite(loss), f"{where}: training after growth gives loss {loss}")
        check.report.max_logit_diff[axis] = worst
        check.passed(f"{axis}: grows {len(configs)} configs "
                     f"({'exact' if exact else f'max logit change {worst:.3g}'}), tensors fit the config, trains on")
        if not exact and worst <= ATOL:
            check.note(f"{axis}: declared exact=False but changed the logits by only {worst:.3g}; "
                       "if it is exact by construction, declare exact = True")
    if hooked:
        check.note(f"save/load not checked on {', '.join(hooked)}: the scheme installs forward hooks, whose effect "
                   "a checkpoint does not hold (fold them into the weights before saving)")
    return check.report


# --------------------------------------------------------- insertion policies
def _check_positions(check: _Check, positions: Any, n: int, k: int, what: str) -> None:
    ok = isinstance(positions, (list, tuple)) and all(type(p) is int for p in positions)
    check(ok, f"{what} returned {positions!r}: must be a list of ints")
    check(len(positions) == k, f"{what} returned {len(positions)} positions for {k} new layers: {list(positions)}")
    bad = [p for p in positions if not 0 <= p <= n]
    check(not bad, f"{what} returned {bad} for a {n}-layer stack: positions must lie in [0, {n}]")


def check_insertion_policy(policy: Any, settings: dict[str, Any] | None = None) -> Report:
    """Positions valid and deterministic for several stack depths and layer counts; growth there exact."""
    import random

    import torch

    name, policy, _ = _resolve("insertion_policy", policy)
    check = _Check("insertion_policy", name)
    parsed = _settings(policy, settings, check)
    for n in (1, 2, 5):
        model = tiny_model("gqa-tied", num_hidden_layers=n)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for k in (1, 2, 3):
            what = f"positions(model with {n} layers, {k})"
            with check.calling(what):
                random.seed(1), torch.manual_seed(1)
                first = policy.positions(model, k, parsed)
                _check_positions(check, first, n, k, what)
                random.seed(2), torch.manual_seed(2)
                again = policy.positions(model, k, parsed)
            check(list(again) == list(first), f"{what} is not deterministic: {list(first)}, then {list(again)}")
        same = all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        check(model.config.num_hidden_layers == n and same, f"positions() changed the model ({n} layers)")
        ids, mask = _inputs(model.config.vocab_size)
        before = _logits(model, ids, mask)
        model.grow_depth(2, positions=list(policy.positions(model, 2, parsed)), init="zero")
        diff, bound = _diff(before, _logits(model, ids, mask))
        check(diff <= bound, f"growth at its positions with init 'zero' changed the logits by {diff:.3g} ({n} layers)")
    check.passed("valid, deterministic positions for 1, 2, 5 layers x 1, 2, 3 new ones; growth there exact")
    return check.report


# ------------------------------------------------------------------ triggers
def _check_decision(check: _Check, decision: Any, step: int) -> dict:
    grow = getattr(decision, "grow", None)
    check(isinstance(grow, bool), f"step {step}: decision.grow={grow!r} must be a bool")
    reason = getattr(decision, "reason", None)
    check(isinstance(reason, str) and reason.strip(),
          f"step {step}: decision.reason={reason!r} must be a non-empty string")
    as_dict = decision.to_dict() if hasattr(decision, "to_dict") else {
        "grow": grow, "reason": reason, "growth": getattr(decision, "growth", None)}
    try:
        as_dict = json.loads(json.dumps(as_dict))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"trigger {check.report.name!r}: step {step}: the decision is not JSON-serialisable "
                             f"({exc}): {as_dict!r}") from None
    growth = getattr(decision, "growth", None)
    if growth is not None:
        try:
            parse_growth_spec(growth)
        except Exception as exc:
            raise AssertionError(f"trigger {check.report.name!r}: step {step}: decision.growth is not a valid "
                                 f"growth step: {exc}") from None
    return as_dict


def _state_json(check: _Check, state: Any, step: int) -> dict:
    try:
        return json.loads(json.dumps(state.state_dict()))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"trigger {check.report.name!r}: step {step}: state_dict() is not JSON-serialisable "
                             f"({exc})") from None


def _report_json(check: _Check, state: Any, step: int, tokens: int, model: Any) -> dict:
    report = state.report(step, tokens, model)
    check(isinstance(report, dict), f"step {step}: report() returned {type(report).__name__}, not a dict")
    try:
        return json.loads(json.dumps(report))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"trigger {check.report.name!r}: step {step}: report() is not JSON-serialisable "
                             f"({exc})") from None


def check_trigger(trigger: Any, settings: dict[str, Any] | None = None, steps: int = 12,
                  max_growths: int = 2) -> Report:
    """Run ``steps`` training steps with the trigger observing and deciding; check every decision and its state.

    Growth a decision asks for is applied (``decision.growth``, else one layer
    at the middle) at most ``max_growths`` times; later ``grow`` decisions are
    checked and recorded but not acted on. Halfway, a second state is started
    and loaded from the first one's ``state_dict()`` (through JSON); from
    then on both see the same calls and must decide alike.
    """
    import torch

    from arbor.plugins.selection import Selection

    name, trigger, _ = _resolve("trigger", trigger)
    check = _Check("trigger", name)
    parsed = _settings(trigger, settings, check)
    model = tiny_model("gqa-tied")
    ids, _ = _inputs(model.config.vocab_size)
    with check.calling("start(model, settings)"):
        states = [trigger.start(model, parsed)]
    if model.stats_interval == 0:
        model.stats_interval = 1  # statistics flow, as they do in a run that collects them
    grown, fired, tokens = 0, 0, 0
    with _seeded(3):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(1, steps + 1):
            loss = _train_steps(model, opt, ids)
            tokens += ids.numel()
            with check.calling(f"observe/decide at step {step}"):
                for state in states:
                    state.observe(step, tokens, loss, model)
                decisions = [_check_decision(check, s.decide(step, tokens, model), step) for s in states]
                _report_json(check, states[0], step, tokens, model)  # goes into the training record
            check.report.decisions.append(decisions[0])
            if len(decisions) == 2:
                check(decisions[0] == decisions[1], f"step {step}: a state restored from state_dict() decides "
                                                    f"{decisions[1]}, the original {decisions[0]}")
            if decisions[0]["grow"]:
                fired += 1
                if grown < max_growths:
                    spec = decisions[0]["growth"] or {"axis": "depth", "num_layers": 1}
                    with check.calling(f"growing as decided at step {step} ({spec})"):
                        event = model.grow(spec, plugins=Selection(), optimizer=opt)
                        grown += 1
                        for state in states:
                            state.grew(step, tokens, model, event)
            saved = _state_json(check, states[0], step)
            if step == steps // 2:
                with check.calling(f"start() + load_state_dict() at step {step}"):
                    resumed = trigger.start(model, parsed)
                    resumed.load_state_dict(saved)
                states.append(resumed)
    check.passed(f"{steps} steps: decisions valid and JSON-serialisable, state_dict and report JSON-serialisable")
    check.passed(f"a state restored at step {steps // 2} decides as the original")
    check.note(f"asked to grow at {fired} of {steps} steps (grew {grown} times)")
    return check.report


# ------------------------------------------------------------ freeze policies
def _canonical_params(model) -> dict[str, Any]:
    # peft wraps a projection as <name>.base_layer; policies speak of the plain names.
    return {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}


def check_freeze_policy(policy: Any, settings: dict[str, Any] | None = None) -> Report:
    """After depth and width growth: returned names real and frozen; frozen parameters never move."""
    import torch

    name, policy, _ = _resolve("freeze_policy", policy)
    check = _Check("freeze_policy", name)
    parsed = _settings(policy, settings, check)
    for cfg in ("mha-untied", "gqa-tied"):
        model = tiny_model(cfg)
        ids, _ = _inputs(model.config.vocab_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train_steps(model, opt, ids)
        n = model.config.num_hidden_layers
        for what, grow in (("depth", lambda: model.grow_depth(1, positions=[n], optimizer=opt)),
                           ("ffn", lambda: model.grow_width(max(model.config.layer_intermediate_sizes) + 4,
                                                            optimizer=opt))):
            where = f"after {what} growth on {cfg}"
            event = grow()
            with check.calling(f"apply() {where}"):
                names = policy.apply(model, event, parsed, optimizer=opt)
            check(isinstance(names, (list, tuple)) and all(isinstance(x, str) for x in names),
                  f"{where}: apply() returned {names!r}: must be a list of parameter names")
            params = _canonical_params(model)
            unknown = [x for x in names if x not in params]
            check(not unknown, f"{where}: apply() returned names that are not parameters: {unknown[:4]}")
            live = [x for x in names if params[x].requires_grad]
            check(not live, f"{where}: apply() says it froze {live[:4]}, but they still require grad")
            frozen = {x: p.detach().clone() for x, p in params.items() if not p.requires_grad}
            _train_steps(model, opt, ids, steps=2)
            params = _canonical_params(model)
            moved = [x for x, v in frozen.items() if not torch.equal(params[x], v)]
            check(not moved, f"{where}: frozen parameters moved over 2 optimizer steps: {moved[:4]}")
            if not any(p.requires_grad for p in params.values()):
                check.note(f"{where}: everything is frozen; nothing trains")
    check.passed("names returned are frozen parameters; frozen parameters do not move (depth and ffn growth)")
    return check.report
