"""Init schemes (zero, split, masked, copy-neighbor, stack), ``model.grow()`` and scheme plugins."""

from __future__ import annotations

import pytest
import torch

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.operators import GrowthError
from arbor.plugins import get_plugin_manager
from arbor_strategies.init_schemes import bake_masks


def small_model(**overrides) -> ArborForCausalLM:
    kwargs = dict(vocab_size=48, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = ArborForCausalLM._from_config(ArborConfig(**{**kwargs, **overrides}), attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


IDS = torch.randint(0, 48, (2, 10), generator=torch.Generator().manual_seed(1))


def train(model, steps=10, lr=3e-3, optimizer=None):
    model.train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------- split
def test_split_ffn_duplicates_units_and_shares_their_output():
    model = small_model()
    before = logits(model, IDS)
    old_down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    event = model.grow_width(40, init="split", init_settings={"noise_std": 0.01})
    assert event.init == "split" and event.exact
    assert (logits(model, IDS) - before).abs().max() < 1e-5
    mlp = model.model.layers[1].mlp
    gate, down = mlp.gate_proj.weight.detach(), mlp.down_proj.weight.detach()
    for j in range(24, 40):  # every new unit reads exactly like some old unit
        src = [u for u in range(24) if torch.equal(gate[j], gate[u])]
        assert len(src) == 1
    # Each original and its copies together write what the original wrote; the noise breaks symmetry.
    sources = {j: next(u for u in range(24) if torch.equal(gate[j], gate[u])) for j in range(24, 40)}
    for u in set(sources.values()):
        members = [u] + [j for j, s in sources.items() if s == u]
        torch.testing.assert_close(down[:, members].sum(1), old_down[:, u], atol=1e-6, rtol=0)
        assert not torch.equal(down[:, members[0]], down[:, members[1]])


def test_split_heads_is_exact_with_new_kv_heads():
    model = small_model()
    before = logits(model, IDS)
    event = model.grow_heads(9, 3, init="split")
    assert event.exact and (logits(model, IDS) - before).abs().max() < 1e-5
    k = model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(k[16:24], k[0:8])  # the new kv head copies kv head 0


def test_split_scales_and_copies_adam_moments():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, steps=2, optimizer=optimizer)
    down = model.model.layers[0].mlp.down_proj.weight
    gate = model.model.layers[0].mlp.gate_proj.weight
    m_down, v_down = optimizer.state[down]["exp_avg"].clone(), optimizer.state[down]["exp_avg_sq"].clone()
    m_gate, step = optimizer.state[gate]["exp_avg"].clone(), optimizer.state[gate]["step"].clone()
    event = model.grow_width(30, layers=[0], init="split", optimizer=optimizer)
    down, gate = model.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.gate_proj.weight
    st_down, st_gate = optimizer.state[down], optimizer.state[gate]
    assert torch.equal(st_gate["step"], step)
    dim, dst, src = event.moment_sources["model.layers.0.mlp.down_proj.weight"]
    counts = torch.bincount(torch.cat([torch.arange(24), src]), minlength=24).float()
    # Staged Training: duplicated units keep the update direction, m / k and v / k^2 ...
    torch.testing.assert_close(st_down["exp_avg"][:, :24], m_down / counts)
    torch.testing.assert_close(st_down["exp_avg_sq"][:, :24], v_down / counts**2)
    # ... and each copy starts with its original's (scaled) moments; incoming rows copy theirs unscaled.
    torch.testing.assert_close(st_down["exp_avg"][:, dst], (m_down / counts)[:, src])
    torch.testing.assert_close(st_gate["exp_avg"][dst], m_gate[src])
    losses = train(model, steps=6, optimizer=optimizer)
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------- masked
def test_masked_is_exact_then_ramps_in_and_disappears():
    model = small_model()
    before = logits(model, IDS)
    event = model.grow_width(40, init="masked", init_settings={"ramp_steps": 4})
    assert event.exact and (logits(model, IDS) - before).abs().max() == 0
    # Unlike zero, the new outgoing weights are not zero: the mask alone keeps the function.
    assert model.model.layers[0].mlp.down_proj.weight[:, 24:].abs().sum() > 0
    mask = model._arbor_masks[0]
    train(model, steps=2, lr=0.0)  # lr 0: weights stay, only the ramp advances
    assert mask.ramp.value == 0.5 and (logits(model, IDS) - before).abs().max() > 1e-4
    train(model, steps=2, lr=0.0)
    assert model._arbor_masks == []
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks  # fully open: hooks removed


@pytest.mark.parametrize("grow", [lambda m: m.grow_depth(2, init="masked"), lambda m: m.grow_heads(8, init="masked"),
                                  lambda m: m.grow_hidden(48, init="masked")])
def test_masked_every_axis_bakes_and_saves(grow, tmp_path):
    model = small_model()
    before = logits(model, IDS)
    grow(model)
    assert (logits(model, IDS) - before).abs().max() < 1e-5
    train(model, steps=3, lr=0.0)  # part-way up the ramp
    mid = logits(model, IDS)
    assert bake_masks(model) > 0
    torch.testing.assert_close(logits(model, IDS), mid, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = ArborForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    torch.testing.assert_close(logits(reloaded, IDS), mid, atol=1e-5, rtol=0)


def test_split_after_masked_skips_units_still_ramping():
    model = small_model()
    before = logits(model, IDS)
    model.grow_heads(6, init="masked")
    model.grow_heads(12, 3, init="split")  # permutes slots: masks must follow, copies must not be of masked heads
    model.grow_width(30, init="masked")
    model.grow_width(50, init="split")
    assert (logits(model, IDS) - before).abs().max() < 1e-5


# -------------------------------------------------------- copy-neighbor, stack
def test_copy_neighbor_copies_the_nearest_layer_and_says_it_is_not_exact():
    model = small_model()
    model.grow_width(40, layers=[0])  # uneven: the copy must take its source's sizes
    event = model.grow_depth(1, positions=[1], init="copy-neighbor")
    assert event.init == "copy-neighbor" and not event.exact
    a, b = model.model.layers[0], model.model.layers[1]
    assert model.config.layer_intermediate_sizes[:2] == [40, 40]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert b.self_attn.layer_idx == 1


def test_stack_appends_copies_of_the_stack_in_order():
    model = small_model()
    old = [state(layer) for layer in model.model.layers]
    event = model.grow_depth(3, init="stack")
    assert event.layers == [3, 4, 5] and not event.exact
    for k in range(3):
        new = model.model.layers[3 + k].state_dict()
        assert all(torch.equal(new[name], old[k][name]) for name in new)
    losses = train(model, steps=8)
    assert losses[-1] < losses[0]  # training goes on from the stacked model


# ----------------------------------------------------------- refusals, errors
@pytest.mark.parametrize(
    ("grow", "message"),
    [
        (lambda m: m.grow_width(40, init="nope"), "not a registered init scheme.*split"),
        (lambda m: m.grow_depth(1, init="split"), "cannot initialise depth"),
        (lambda m: m.grow_width(40, init="masked", init_settings={"ramp_steps": 0}), "ramp_steps"),
        (lambda m: m.grow_width(40, init="split", init_settings={"noise": 1}), "noise"),
        (lambda m: m.grow_depth(1, policy="nowhere"), "insertion policy.*middle"),
    ],
)
def test_bad_init_or_policy_is_refused_before_anything_changes(grow, message):
    model = small_model()
    before = state(model)
    with pytest.raises(GrowthError, match=message):
        grow(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------- model.grow
def test_grow_defaults_to_four_zero_layers_at_the_middle():
    model = small_model(max_layers=16)
    before = logits(model, IDS)
    event = model.grow()
    assert event.axis == "depth" and event.layers == [1, 2, 3, 4] and event.exact
    assert (logits(model, IDS) - before).abs().max() < 1e-5


def test_grow_follows_config_growth_and_it_saves(tmp_path):
    model = small_model(growth={"axis": "ffn", "factor": 1.5, "init": "split"})
    event = model.grow()
    assert event.init == "split" and model.config.layer_intermediate_sizes == [36, 36, 36]
    model.grow()
    assert model.config.layer_intermediate_sizes == [54, 54, 54]
    model.save_pretrained(tmp_path)
    reloaded = ArborForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.growth == {"axis": "ffn", "factor": 1.5, "init": "split"}
    model.config.growth = {"axis": "heads", "add": 2}
    assert model.grow().layers == [0, 1, 2] and model.config.layer_num_attention_heads == [6, 6, 6]
    model.config.growth = {"axis": "hidden", "add": 16}
    assert model.grow().axis == "hidden" and model.config.hidden_size == 48


def test_grow_takes_init_and_policy_from_plugins_toml(tmp_path, fresh_plugins):
    path = tmp_path / "plugins.toml"
    path.write_text('[init_scheme]\nname = "stack"\n\n[insertion_policy]\nname = "top"\n')
    model = small_model(growth={"axis": "depth", "num_layers": 2})
    event = model.grow(plugins=path)
    assert event.init == "stack" and event.layers == [3, 4] and not event.exact


def test_bad_growth_spec_names_the_field():
    with pytest.raises(ValueError, match="growth.*factor or add"):
        ArborConfig(growth={"axis": "ffn"})
    with pytest.raises(ValueError, match="growth.axis"):
        ArborConfig(growth={"axis": "sideways"})


# -------------------------------------------------------- third-party schemes
class Halve(arbor_plugins.InitScheme):
    """A deliberately non-exact scheme: halves every new layer's MLP input weights."""

    description = "test scheme"
    exact = False
    axes = ("depth",)

    def initialize(self, model, event, settings):
        for i in event.layers:
            model.model.layers[i].mlp.up_proj.weight.mul_(0.5)


class Plugin:
    def __init__(self):
        self.seen = []

    @arbor_plugins.hookimpl
    def arbor_register(self, registry):
        registry.register("init_scheme", "halve", Halve())

    @arbor_plugins.hookimpl
    def arbor_grow_depth(self, model, event):
        self.seen.append((event.init, event.exact))


def test_a_plugin_scheme_runs_before_the_hooks_see_the_event(fresh_plugins):
    plugin = Plugin()
    get_plugin_manager().register(plugin, name="test-halve")
    model = small_model()
    event = model.grow_depth(1, init="halve")
    assert (event.init, event.exact) == ("halve", False)
    assert plugin.seen == [("halve", False)]  # the hook saw the scheme's name and exactness
