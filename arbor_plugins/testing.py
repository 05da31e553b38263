"""Conformance kit: check that a component keeps the contract arbor relies on.

Every check builds tiny random models (logits of order 1), drives the
component through the path arbor drives it through, and raises
``AssertionError`` naming the component, what was checked and the values
found. It works from any test runner::

    from arbor_plugins.testing import check_component, check_init_scheme, check_plugin

    check_init_scheme(MyScheme())                    # an object, registered or not
    check_component("trigger", "my-trigger", settings={"window": 5})
    reports = check_plugin("arbor-strategy-x")       # every component the distribution registers

Each check returns a :class:`Report` of what passed and what is worth
knowing without being a failure (a non-exact init scheme's change of the
logits, a save/load skipped because a scheme installed forward hooks).

With pytest, ``pytest_plugins = ["arbor_plugins.testing"]`` in a
``conftest.py`` adds the fixtures ``arbor_tiny_model`` and ``arbor_registry``.

Settings: a check uses ``settings=`` when given, else the component's optional
``example_settings`` class attribute (a dict; for components whose settings
have required fields, so `check_plugin` can run them unattended), else ``{}``.
What each check covers is in its docstring and in docs/plugins.md.

The kit imports ``torch`` and ``arbor`` inside the checks: ``arbor_plugins``
stays importable without them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TINY_CONFIGS",
    "Report",
    "check_attention_backend",
    "check_component",
    "check_freeze_policy",
    "check_init_scheme",
    "check_insertion_policy",
    "check_plugin",
    "check_rope_scaling",
    "check_substrate",
    "check_trigger",
    "tiny_model",
]

#: Small configs the checks grow: grouped-query + tied, multi-head + untied, multi-query with one layer.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-tied": dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True),
    "mha-untied": dict(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    "mqa-one-layer": dict(vocab_size=24, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False),
}
#: Exactness bound at logits of order 1; it scales with the logits' size (fp32 rounding does).
ATOL = 1e-5
AXES = ("depth", "ffn", "heads", "hidden")


@dataclass
class Report:
    """What a check established about one component."""

    kind: str
    name: str
    #: The checks that passed, in words.
    passed: list[str] = field(default_factory=list)
    #: Worth knowing, not failures (a non-exact scheme's logit change, a skipped save/load).
    notes: list[str] = field(default_factory=list)
    #: Init schemes: the declared ``exact`` flag, and the largest logit change per axis.
    exact: bool | None = None
    max_logit_diff: dict[str, float] = field(default_factory=dict)
    #: Triggers: every decision of the loop (``to_dict()`` form), in order.
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.kind} {self.name!r}: {len(self.passed)} checks passed"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Check:
    """Failures name the component; passes are recorded in the report."""

    def __init__(self, kind: str, name: str):
        self.report = Report(kind, name)

    def __call__(self, ok: Any, message: str) -> None:
        if not ok:
            raise AssertionError(f"{self.report.kind} {self.report.name!r}: {message}")

    def passed(self, what: str) -> None:
        self.report.passed.append(what)

    def note(self, what: str) -> None:
        self.report.notes.append(what)

    @contextlib.contextmanager
    def calling(self, what: str):
        """An exception from the component fails the check with its name on it."""
        try:
            yield
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{self.report.kind} {self.report.name!r}: {what} raised "
                                 f"{type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Deterministic inside, and the caller's RNG state untouched afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_model(config: str | dict[str, Any] = "gqa-tied", seed: int = 0, **overrides: Any):
    """A tiny random `ArborForCausalLM` in eval mode whose logits are of order 1.

    ``config`` names one of :data:`TINY_CONFIGS` or is a dict of config fields.
    Weight matrices are drawn with std 0.2 (the default 0.02 would give logits
    near zero, where any change looks small); buffers are left as built.
    """
    import torch

    from arbor import ArborConfig, ArborForCausalLM

    fields = dict(TINY_CONFIGS[config]) if isinstance(config, str) else dict(config)
    fields = {"max_position_embeddings": 64, **fields, **overrides}
    with _seeded(seed):
        model = ArborForCausalLM(ArborConfig(**fields))
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0.0, 0.2)
    return model.eval()


def _inputs(vocab: int, seed: int = 1):
    """Two rows of 8 tokens, the second left-padded by 2."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _logits(model, ids, mask):
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    model.train(was_training)
    return out[mask.bool()]  # padded positions compute nothing anyone reads


def _greedy(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)[0].tolist()


def _diff(a, b) -> tuple[float, float]:
    """(max abs difference, the bound exactness allows for logits like ``a``)."""
    return float((a - b).abs().max()), ATOL * max(1.0, float(a.abs().max()))


def _train_steps(model, optimizer, ids, steps: int = 1) -> float:
    model.train()
    loss = None
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def _hooks(model) -> set[int]:
    return {id(h) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()}


def _shapes_fit_config(check: _Check, model) -> None:
    """The grown tensors are the ones its config describes: what save -> load relies on."""
    import torch

    model.config.validate_arbor()
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {k: (have.get(k), want.get(k)) for k in want.keys() | have.keys() if have.get(k) != want.get(k)}
    check(not wrong, f"tensors do not fit the config (name: (model, config)): {dict(sorted(wrong.items())[:4])}")


def _save_load(check: _Check, model, ids, mask, what: str) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = type(model).from_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    ref = _logits(model, ids, mask)
    diff, bound = _diff(ref, _logits(loaded, ids, mask))
    check(diff <= bound, f"{what}: save_pretrained -> from_pretrained changes the logits by {diff:.3g} (> {bound:.3g})")


def _settings(component: Any, settings: dict[str, Any] | None, check: _Check):
    """Validated settings: ``settings``, else the component's ``example_settings``, else defaults."""
    if settings is None:
        settings = getattr(component, "example_settings", None) or {}
    validate = getattr(component, "validate_settings", None)
    check(callable(validate), "has no validate_settings(); subclass arbor_plugins.Component or provide one")
    try:
        return validate(settings)
    except Exception as exc:
        from pydantic import ValidationError

        from arbor_plugins.settings import describe_validation_error

        why = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise AssertionError(
            f"{check.report.kind} {check.report.name!r}: settings {settings!r} are invalid ({why}); "
            "pass settings= or give the component an example_settings dict"
        ) from None


def _name_of(component: Any) -> str:
    return getattr(component, "name", None) or type(component).__name__


def _resolve(kind: str, component: Any, registry=None) -> tuple[str, Any, bool]:
    """(name, component, registered) for a registered name or a component object."""
    if registry is None:
        from arbor.plugins import get_registry

        registry = get_registry()
    if isinstance(component, str):
        return component, registry.get(kind, component), True
    for entry in registry.entries(kind):
        if entry.component is component:
            return entry.name, component, True
    return _name_of(component), component, False


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


# ---------------------------------------------------------------- substrates
def check_substrate(substrate: Any, settings: dict[str, Any] | None = None, export: bool = True) -> Report:
    """Build, shape, ``.weight``, frozen-ness, export and save/load of a substrate (untied head)."""
    import torch

    from arbor import ArborConfig

    name, substrate, registered = _resolve("substrate", substrate)
    check = _Check("substrate", name)
    parsed = _settings(substrate, settings, check)
    raw = settings if settings is not None else getattr(substrate, "example_settings", None) or {}
    fields = dict(TINY_CONFIGS["mha-untied"], max_position_embeddings=64)
    config = ArborConfig(**fields, **({"substrate": name, "substrate_settings": raw} if registered else {}))
    modules = []
    for _ in range(2):
        with _seeded(0), check.calling("build(config, settings)"):
            modules.append(substrate.build(config, parsed))
    a, b = modules
    ids, mask = _inputs(config.vocab_size)
    sa, sb = a.state_dict(), b.state_dict()
    check(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa),
          "two builds from the same config, settings and seed differ")
    with torch.no_grad(), check.calling("the built module's forward"):
        out, out_b = a(ids), b(ids)
    want = (*ids.shape, config.hidden_size)
    check(tuple(out.shape) == want, f"output shape {tuple(out.shape)} for input {tuple(ids.shape)}: expected {want}")
    check(out.is_floating_point() and bool(torch.isfinite(out).all()), f"output must be finite floats, got {out.dtype}")
    check(torch.equal(out, out_b), "two equal builds give different outputs")
    weight = getattr(a, "weight", None)
    check(torch.is_tensor(weight), f"module {type(a).__name__} has no .weight tensor (the (vocab, hidden) matrix)")
    shape = (config.vocab_size, config.hidden_size)
    check(tuple(weight.shape) == shape, f".weight has shape {tuple(weight.shape)}: expected (vocab, hidden) = {shape}")
    frozen = getattr(substrate, "frozen", False)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    if frozen:
        check(not trainable, f"declared frozen but has trainable parameters: {trainable}")
    elif not trainable:
        check.note("declared trainable (frozen = False) but has no trainable parameter")
    check.passed("deterministic build, (batch, seq, hidden) output, (vocab, hidden) .weight")

    if registered:
        with check.calling("building a model with it"):
            model = tiny_model(config.to_dict())
    else:  # not registered: a config cannot name it, so put its module in place by hand
        model = tiny_model(fields)
        with _seeded(0):
            model.model.embed_tokens = substrate.build(config, parsed)
    embed = model.model.embed_tokens
    held = {k: v.clone() for k, v in embed.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in embed.named_parameters()}
    opt.step()
    _train_steps(model, opt, ids, steps=2)
    if frozen:
        check(all(g is None for g in grads.values()), f"declared frozen but got gradients: {sorted(grads)}")
        moved = [k for k, v in embed.state_dict().items() if not torch.equal(v, held[k])]
        check(not moved, f"declared frozen but moved over 3 AdamW steps (weight decay 0.1): {moved}")
        check.passed("frozen: no gradient, no movement under AdamW")
    elif trainable and all(grads.get(n) is None for n in trainable):
        check.note("trainable parameters got no gradient from the language-model loss")
    if export:
        from arbor.export import ExportError, to_llama

        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = to_llama(model, f"{tmp}/llama")
            except ExportError as exc:
                raise AssertionError(f"substrate {name!r}: export to Llama fails: {exc}") from None
        check.passed(f"exports to LlamaForCausalLM (max logit difference {report.max_abs_diff:.3g})")
    if registered:
        _save_load(check, model, ids, mask, "a model with this substrate")
        check.passed("save_pretrained -> from_pretrained keeps the logits")
    else:
        check.note("not registered: save/load not checked (from_pretrained finds substrates by name)")
    # Hidden-size growth: an nn.Embedding is widened by the operator, anything else by its grow_hidden(d).
    if isinstance(embed, torch.nn.Embedding) or callable(getattr(embed, "grow_hidden", None)):
        before = _logits(model, ids, mask)
        with check.calling("hidden-size growth"):
            model.grow_hidden(config.hidden_size + 8)
        diff, bound = _diff(before, _logits(model, ids, mask))
        check(diff <= bound, f"hidden-size growth changed the logits by {diff:.3g} (> {bound:.3g})")
        got, want = tuple(model.model.embed_tokens.weight.shape), (config.vocab_size, config.hidden_size + 8)
        check(got == want, f"after hidden-size growth .weight has shape {got}: expected {want}")
        if registered:
            _save_load(check, model, ids, mask, "after hidden-size growth")
        check.passed("hidden-size growth is exact" + (" and saves" if registered else ""))
    else:
        check.note("no grow_hidden(d): models with this substrate cannot grow their hidden size")
    return check.report


# ------------------------------------------------------------------ triggers
def _check_decision(check: _Check, decision: Any, step: int) -> dict:
    from arbor.growable import parse_growth_spec

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

    from arbor.plugins_toml import Selection

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
    check.passed(f"{steps} steps: decisions valid and JSON-serialisable, state_dict JSON-serialisable")
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


# -------------------------------------------------------- attention backends
def check_attention_backend(backend: Any, settings: dict[str, Any] | None = None) -> Report:
    """``is_available()`` answers (bool, reason); when available, logits match the eager kernel."""
    import torch

    name, backend, registered = _resolve("attention_backend", backend)
    check = _Check("attention_backend", name)
    _settings(backend, settings, check)
    with check.calling("is_available()"):
        answer = backend.is_available()
    check(isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool) and isinstance(answer[1], str),
          f"is_available() returned {answer!r}: must be (bool, reason)")
    if not answer[0]:
        check(answer[1].strip(), "is_available() says no without a reason for the user")
        check.note(f"not available here ({answer[1]}): kernel not run")
        return check.report
    impl = name if registered else getattr(backend, "implementation", None)
    check(isinstance(impl, str) and impl, f"implementation={impl!r} must name a transformers attention key")
    ref, model = tiny_model("gqa-tied"), tiny_model("gqa-tied")
    ref.set_attn_implementation("eager")
    ids, _ = _inputs(ref.config.vocab_size)
    full = torch.ones_like(ids)  # unpadded: some kernels (flex on CPU) take no padding mask
    with check.calling(f"a model with attn_implementation={impl!r}"):
        model.set_attn_implementation(impl)
        logits = _logits(model, ids, full)
    diff, bound = _diff(_logits(ref, ids, full), logits)
    # Kernels sum in different orders: allow fp32 rounding, not the exactness bound.
    check(diff <= 100 * bound, f"logits differ from eager attention by {diff:.3g} (> {100 * bound:.3g})")
    check.passed(f"runs, logits within {diff:.3g} of eager")
    return check.report


# -------------------------------------------------------------- rope scaling
def check_rope_scaling(scaling: Any, settings: dict[str, Any] | None = None) -> Report:
    """``apply`` returns a new valid RoPE dict, leaves its input alone, and a model runs with it."""
    from arbor import ArborConfig

    name, scaling, _ = _resolve("rope_scaling", scaling)
    check = _Check("rope_scaling", name)
    parsed = _settings(scaling, settings, check)
    given = {"rope_type": "default", "rope_theta": 10_000.0}
    kept = copy.deepcopy(given)
    with check.calling("apply(rope_parameters, settings)"):
        result = scaling.apply(given, parsed)
    check(given == kept, f"apply() changed its input: {kept} -> {given}")
    check(isinstance(result, dict) and "rope_type" in result,
          f"apply() returned {result!r}: must be a dict with rope_type")
    check(result == scaling.apply(copy.deepcopy(kept), parsed), "apply() is not deterministic")
    try:
        json.dumps(result)
        config = ArborConfig(**TINY_CONFIGS["gqa-tied"], max_position_embeddings=64, rope_parameters=result)
    except Exception as exc:
        raise AssertionError(f"rope_scaling {name!r}: {result!r} is not a valid rope_parameters dict: {exc}") from None
    ids, mask = _inputs(config.vocab_size)
    with check.calling(f"a model with rope_parameters={result}"):
        logits = _logits(tiny_model(config.to_dict()), ids, mask)
    check(bool(logits.isfinite().all()), f"a model with rope_parameters={result} gives non-finite logits")
    check.passed(f"valid rope_parameters {result}")
    return check.report


# ------------------------------------------------------------------ dispatch
_CHECKS = {
    "init_scheme": check_init_scheme,
    "insertion_policy": check_insertion_policy,
    "substrate": check_substrate,
    "trigger": check_trigger,
    "freeze_policy": check_freeze_policy,
    "attention_backend": check_attention_backend,
    "rope_scaling": check_rope_scaling,
}


def check_component(kind: str, name: str, settings: dict[str, Any] | None = None) -> Report:
    """Run the check for ``kind`` on the component registered as ``name``."""
    from arbor_plugins.registry import KINDS

    if kind not in _CHECKS:
        raise ValueError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _CHECKS[kind](name, settings=settings)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_plugin(plugin: str, settings: dict[str, dict[str, Any]] | None = None) -> list[Report]:
    """Check every component ``plugin`` registers (a distribution or entry-point name).

    ``settings`` maps a component name (or ``"kind:name"``) to its settings.
    The plugin must have loaded without error and registered something.
    """
    from arbor.plugins import plugin_infos

    wanted = _canonical(plugin)
    infos = [i for i in plugin_infos()
             if wanted in {_canonical(i["distribution"] or ""), _canonical(i["entry_point"] or "")}]
    found = sorted({i["distribution"] for i in plugin_infos() if i["distribution"]})
    if not infos:
        raise AssertionError(f"plugin {plugin!r} is not installed (or ARBOR_LOAD_PLUGINS leaves it out); "
                             f"plugins found: {', '.join(found)}")
    for info in infos:
        if "error" in info:
            raise AssertionError(info["error"])
    components = [(c["kind"], c["name"]) for i in infos for c in i["components"]]
    if not components:
        raise AssertionError(f"plugin {plugin!r} loads but registers no component")
    settings = settings or {}
    reports = []
    for kind, name in components:
        chosen = settings.get(f"{kind}:{name}", settings.get(name))
        reports.append(check_component(kind, name, settings=chosen))
    return reports


# ------------------------------------------------------------ pytest fixtures
try:  # the plain checks above work without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def arbor_tiny_model():
        """A fresh tiny random model (grouped-query attention, tied embeddings), logits of order 1."""
        return tiny_model("gqa-tied")

    @pytest.fixture
    def arbor_registry():
        """The registry of every loaded plugin's components."""
        from arbor.plugins import get_registry

        return get_registry()
