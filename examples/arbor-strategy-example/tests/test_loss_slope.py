"""The loss-slope trigger: its fit, its decisions, and the arbor conformance kit."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest

from arbor_plugins.testing import check_plugin, check_trigger
from arbor_strategy_example import LossSlopeTrigger

TRIGGER = LossSlopeTrigger()


def start(model, **settings):
    return TRIGGER.start(model, TRIGGER.validate_settings(settings))


def feed(state, model, loss, steps, tokens_per_step=1000):
    """Observe ``loss(T)`` for ``steps`` steps; the decisions, one per step."""
    decisions = []
    for step in range(1, steps + 1):
        tokens = step * tokens_per_step
        state.observe(step, tokens, loss(tokens), model)
        decisions.append(state.decide(step, tokens, model))
    return decisions


def test_conformance_kit():
    report = check_trigger(TRIGGER, steps=16)
    assert report.passed and any(d["grow"] for d in report.decisions)


def test_conformance_of_the_installed_plugin():
    try:
        importlib.metadata.distribution("arbor-strategy-example")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not installed: pip install -e . to check the entry point too")
    reports = check_plugin("arbor-strategy-example")
    assert {(r.kind, r.name) for r in reports} == {("trigger", "loss-slope"), ("init_scheme", "fade-in")}
    assert all(r.passed for r in reports)


def test_fitted_slope_is_the_power_law_exponent(arbor_tiny_model):
    state = start(arbor_tiny_model, min_observations=10)
    feed(state, arbor_tiny_model, lambda t: 7.0 * t ** -0.3, 200)
    alpha, n = state.slope()
    assert abs(alpha - 0.3) < 1e-9 and n >= 100  # exact least squares over the last doubling


def test_a_clean_power_law_never_triggers_but_a_saturating_curve_does(arbor_tiny_model):
    # loss-plateau's relative gain over a fixed window shrinks like 1/T on ANY power law;
    # the log-log slope does not move while the curve stays a power law.
    pure = feed(start(arbor_tiny_model, min_slope=0.1, min_observations=10), arbor_tiny_model,
                lambda t: 7.0 * t ** -0.3, 2000)
    assert not any(d.grow for d in pure)
    # With a floor E the local exponent is alpha * (L - E) / L, which tends to 0.
    floor, A, alpha = 2.0, 400.0, 0.5
    decisions = feed(start(arbor_tiny_model, min_slope=0.1, min_observations=10), arbor_tiny_model,
                     lambda t: floor + A * t ** -alpha, 2000)
    first = next(i for i, d in enumerate(decisions, 1) if d.grow)
    local = lambda t: alpha * A * t ** -alpha / (floor + A * t ** -alpha)  # noqa: E731
    # The fit averages the local exponent over the last doubling: it fires once that average
    # crosses the threshold, between the two ends of the window.
    assert local(first * 1000) < 0.1 < local(first * 1000 / 2)
    assert "loss ~ tokens^-0.09" in decisions[first - 1].reason


def test_growth_restarts_the_window_and_state_round_trips(arbor_tiny_model):
    state = start(arbor_tiny_model, min_slope=1.0, min_observations=5, growth={"axis": "ffn", "add": 8})
    decisions = feed(state, arbor_tiny_model, lambda t: 3.0, 20)
    fired = next(i for i, d in enumerate(decisions, 1) if d.grow)
    assert all("waiting" in d.reason for d in decisions[:fired - 1])
    assert decisions[fired - 1].growth == {"axis": "ffn", "add": 8}
    state.grew(fired, fired * 1000, arbor_tiny_model, None)
    assert "since the growth" in state.decide(fired, fired * 1000, arbor_tiny_model).reason
    # The next decision needs a whole window after the growth: tokens from T to 2T.
    again = next(step for step in range(fired + 1, 10 * fired) if
                 state.observe(step, step * 1000, 3.0, arbor_tiny_model) or
                 state.decide(step, step * 1000, arbor_tiny_model).grow)
    assert abs(again - 2 * (fired + 1)) <= 1
    restored = start(arbor_tiny_model, min_slope=1.0, min_observations=5)
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    assert restored.slope() == state.slope()


def test_depth_growth_respects_max_layers(arbor_tiny_model):
    arbor_tiny_model.config.max_layers = arbor_tiny_model.config.num_hidden_layers + 1
    state = start(arbor_tiny_model, min_slope=1.0, min_observations=5, growth={"axis": "depth", "num_layers": 2})
    last = feed(state, arbor_tiny_model, lambda t: 3.0, 20)[-1]
    assert not last.grow and "exceed max_layers" in last.reason


def test_steps_clock_and_bad_losses(arbor_tiny_model):
    state = start(arbor_tiny_model, clock="steps", min_observations=5)
    for step in range(1, 21):
        state.observe(step, 0, 2.0 * step ** -0.5 if step != 15 else math.nan, arbor_tiny_model)
    alpha, n = state.slope()
    assert abs(alpha - 0.5) < 1e-9 and n == 10  # steps 10..20, less the NaN


@pytest.mark.parametrize("bad", [{"span": 1.0}, {"min_slope": 0}, {"clock": "hours"}, {"windw": 3}])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        TRIGGER.validate_settings(bad)
