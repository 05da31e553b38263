"""Built-in strategies: activation statistics, triggers, insertion and freeze policies."""

from __future__ import annotations

import json

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.plugins import get_registry
from arbor.plugins.selection import PluginsConfigError, load_plugins_toml
from arbor_strategies.stats import LayerStats, layer_utilization

IDS = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))


def model_of(layers=3, **overrides) -> ArborForCausalLM:
    kwargs = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_layers=12)
    return ArborForCausalLM(ArborConfig(**{**kwargs, **overrides}))


def component(kind, name):
    return get_registry().get(kind, name)


def start(name, model, **settings):
    trigger = component("trigger", name)
    return trigger.start(model, trigger.validate_settings(settings))


# ---------------------------------------------------------------- statistics
def test_participation_ratio_measures_how_many_dimensions_are_used():
    stats = LayerStats()
    gen = torch.Generator().manual_seed(0)
    stats.add(0, torch.randn(1, 4000, 16, generator=gen))  # isotropic: every dimension used
    stats.add(1, torch.randn(1, 4000, 1, generator=gen) * torch.randn(1, 1, 16, generator=gen))  # rank one
    half = torch.randn(1, 4000, 16, generator=gen)
    half[..., 8:] = 0
    stats.add(2, half)  # half the dimensions
    full, rank_one, halfway = stats.utilization()
    assert full > 0.95 and rank_one < 1 / 16 + 1e-3 and 0.45 < halfway < 0.55
    # Scale-free: the same activations 100x larger give the same utilization.
    stats.reset()
    stats.add(0, half * 100)
    assert abs(stats.utilization()[0] - halfway) < 1e-4


def test_statistics_only_on_interval_steps_in_training():
    model = model_of()
    with torch.no_grad():
        model.eval()
        model(IDS)
        assert layer_utilization(model) is None  # inference collects nothing
        model.train()
        model.stats_interval = 2
        for _ in range(4):  # forwards 0 and 2 collect
            model(IDS)
    util = layer_utilization(model, min_records=2)
    assert util is not None and len(util) == 3 and all(1 / 16 <= u <= 1 for u in util)
    assert layer_utilization(model, min_records=3) is None


# ------------------------------------------------------------------ triggers
def run(state, model, steps, loss=lambda step: 1.0, tokens_per_step=24, forward=True):
    """A minimal loop: forward (for statistics), observe, decide, grow when told; returns growth steps."""
    grown = []
    for step in range(1, steps + 1):
        if forward:
            with torch.no_grad():
                model.train()
                model(IDS)
        tokens = step * tokens_per_step
        state.observe(step, tokens, loss(step), model)
        decision = state.decide(step, tokens, model)
        json.dumps(decision.to_dict())  # decisions go into logs and checkpoints
        assert decision.reason
        if decision.grow:
            event = model.grow(decision.growth or {"axis": "depth", "num_layers": 1})
            state.grew(step, tokens, model, event)
            grown.append(step)
    json.dumps(state.state_dict())
    return grown


def test_utilization_fires_when_enough_layers_are_busy_then_cools_down():
    model = model_of()
    state = start("utilization", model, threshold=0.01, fraction=0.8, cooldown=3, history=2, stats_interval=1,
                  num_layers=1)
    # Two statistics per layer needed; then grow; cooldown 3 steps; then 2 fresh statistics again.
    assert run(state, model, 9) == [2, 5, 8]
    assert model.config.num_hidden_layers == 6


def test_utilization_does_not_fire_below_the_threshold_or_past_max_layers():
    model = model_of()
    state = start("utilization", model, threshold=1.0, history=1, stats_interval=1)
    assert run(state, model, 4) == []  # utilization never exceeds 1
    model = model_of(layers=3, max_layers=4)
    state = start("utilization", model, threshold=0.01, history=1, stats_interval=1, num_layers=4)
    assert run(state, model, 3) == []
    assert "max_layers=4" in state.decide(3, 0, model).reason


def test_loss_plateau_fires_when_the_smoothed_loss_stops_improving():
    model = model_of()
    state = start("loss-plateau", model, window=5, epsilon=0.01, beta=0.0, cooldown=10)
    losses = lambda step: 10.0 / step if step <= 10 else 1.0  # noqa: E731 - improving, then flat
    grown = run(state, model, 30, loss=losses, forward=False)
    assert grown == [15, 25]  # losses of steps 10..15 are flat (window + 1 of them); then a cooldown of 10
    saved = state.state_dict()
    again = start("loss-plateau", model, window=5, epsilon=0.01, beta=0.0, cooldown=10)
    again.load_state_dict(json.loads(json.dumps(saved)))
    assert again.decide(31, 0, model).to_dict() == state.decide(31, 0, model).to_dict()


def test_schedule_fires_once_at_each_mark_with_its_step():
    model = model_of()
    state = start("schedule", model, steps=[3, 6],
                  growth=[{"axis": "depth", "num_layers": 3, "policy": "top"}, {"axis": "ffn", "add": 8}])
    assert run(state, model, 10, forward=False) == [3, 6]
    assert model.config.num_hidden_layers == 6 and model.config.layer_intermediate_sizes == [40] * 6
    tokens = start("schedule", model_of(), tokens=[100])
    assert run(tokens, model_of(), 6, tokens_per_step=24, forward=False) == [5]  # 120 tokens >= 100


def test_compute_optimal_grows_after_tokens_per_parameter_times_size():
    model = model_of()
    params = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    state = start("compute-optimal", model, tokens_per_parameter=0.01)
    budget = 0.01 * params
    grown = run(state, model, 40, tokens_per_step=10, forward=False)
    assert grown and grown[0] == int(-(-budget // 10))  # the first step whose tokens reach the budget
    assert len(grown) >= 2 and grown[1] - grown[0] > grown[0]  # a bigger model waits longer


@pytest.mark.parametrize(("settings", "message"), [
    ({"threshold": 1.5}, "threshold"), ({"measure": "vibes"}, "measure"), ({"colldown": 3}, "colldown"),
])
def test_trigger_settings_are_checked(settings, message, tmp_path):
    lines = ['[trigger]', 'name = "utilization"'] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "plugins.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PluginsConfigError, match=message):
        load_plugins_toml(path)


def test_schedule_settings_are_checked():
    trigger = component("trigger", "schedule")
    for bad in ({"steps": [5, 3]}, {"steps": [1], "tokens": [2]}, {"steps": [1, 2], "growth": [{}]}):
        with pytest.raises(ValueError):
            trigger.validate_settings(bad)


# ------------------------------------------------------- insertion policies
@pytest.mark.parametrize(("name", "settings", "expected"), [
    ("middle", {}, [2, 2]), ("top", {}, [4, 4]), ("bottom", {}, [0, 0]), ("stack", {}, [4, 4]),
    ("interleave", {"every": 2}, [2, 4]), ("interleave", {"every": 1}, [1, 2]),
])
def test_insertion_policies(name, settings, expected):
    model = model_of(layers=4)
    policy = component("insertion_policy", name)
    assert policy.positions(model, 2, policy.validate_settings(settings)) == expected
    event = model.grow_depth(2, policy=(name, settings))
    assert event.layers == [p + k for k, p in enumerate(expected)]


# ----------------------------------------------------------- freeze policies
def test_freeze_below_trains_only_the_new_layers_and_the_head():
    model = model_of(tie_word_embeddings=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    event = model.grow_depth(2, policy="top", optimizer=opt)
    policy = component("freeze_policy", "freeze-below")
    frozen = policy.apply(model, event, policy.validate_settings({}), optimizer=opt)
    assert "model.embed_tokens.weight" in frozen and "model.layers.0.mlp.up_proj.weight" in frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters())
                         if n.startswith(("model.layers.3.", "model.layers.4.", "lm_head", "model.norm"))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in trainable), name
    assert policy.apply(model, model.grow_width(40), policy.validate_settings({})) == []  # width: no-op
