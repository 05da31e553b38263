"""Exactness of growth: random configs x random sequences of growth steps.

With an exact init (zero, split, masked) the grown model must compute the same function:
same logits (fp32, max abs diff <= 1e-5 at logits of order 1), same greedy
continuation with and without KV cache, padded batches included, and the
same after save -> load.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM, compat
from arbor.growth.operators import GrowthError
from arbor.plugins import get_plugin_manager
from arbor_strategies.init_schemes import bake_masks

ATOL = 1e-5


@st.composite
def configs(draw) -> dict:
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(
        vocab_size=draw(st.integers(16, 64)),
        hidden_size=heads * head_dim * draw(st.sampled_from([1, 2])),
        head_dim=head_dim,
        intermediate_size=draw(st.integers(4, 32)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
    )


#: Exact init schemes and the axes each one initialises.
EXACT_INITS = {"zero": ("depth", "ffn", "heads", "hidden"), "split": ("ffn", "heads"),
               "masked": ("depth", "ffn", "heads", "hidden")}


@st.composite
def growth_steps(draw) -> list[tuple]:
    steps = []
    for _ in range(draw(st.integers(1, 5))):
        axis = draw(st.sampled_from(["depth", "ffn", "heads", "hidden"]))
        init = draw(st.sampled_from([k for k, axes in EXACT_INITS.items() if axis in axes]))
        if axis == "depth":
            steps.append(("depth", init, draw(st.integers(1, 2)), draw(st.floats(0, 1))))
        elif axis == "ffn":
            steps.append(("ffn", init, draw(st.integers(0, 24)), draw(st.booleans())))
        elif axis == "heads":
            steps.append(("heads", init, draw(st.integers(0, 2)), draw(st.booleans())))
        else:
            steps.append(("hidden", init, draw(st.sampled_from([8, 16]))))
    return steps


def apply(model: ArborForCausalLM, step: tuple):
    config = model.config
    n = config.num_hidden_layers
    axis, init = step[:2]
    if axis == "depth":
        _, _, k, where = step
        return model.grow_depth(k, positions=[round(where * n)] * k, init=init)
    if axis == "ffn":
        _, _, extra, one_layer = step
        layer = n - 1 if one_layer else None
        target = max(config.layer_intermediate_sizes) + extra
        return model.grow_width(target, layers=layer, init=init)
    if axis == "heads":
        _, _, extra_groups, more_kv = step
        layer = 0
        q, kv = config.layer_num_attention_heads[layer], config.layer_num_key_value_heads[layer]
        new_kv = kv + (1 if more_kv else 0)
        new_q = (q // kv + extra_groups) * new_kv
        return model.grow_heads(new_q, new_kv, layers=[layer], init=init)
    return model.grow_hidden(config.hidden_size + step[2], init=init)


def scaled_model(kwargs: dict) -> ArborForCausalLM:
    model = ArborForCausalLM._from_config(ArborConfig(**kwargs), attn_implementation="sdpa").eval()
    with torch.no_grad():  # weights large enough that a broken growth step shows, logits of order 1
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model


def padded_batch(vocab: int):
    rows = [torch.randint(1, vocab, (n,)) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    return ids, mask


def observe(model, ids, mask):
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions).logits * mask[..., None]
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                  use_cache=False)
    return logits, greedy, uncached


@given(kwargs=configs(), steps=growth_steps())
def test_growth_is_exact(kwargs, steps, tmp_path_factory):
    torch.manual_seed(0)
    model = scaled_model(kwargs)
    ids, mask = padded_batch(kwargs["vocab_size"])
    logits, greedy, _ = observe(model, ids, mask)
    for step in steps:
        event = apply(model, step)
        assert event.exact and event.init == step[1]
        new_logits, new_greedy, uncached = observe(model, ids, mask)
        # The contract's 1e-5 is for logits of order 1; these are larger, so the bound scales with them.
        assert (new_logits - logits).abs().max().item() <= ATOL * max(1.0, logits.abs().max().item()), step
        assert torch.equal(new_greedy, greedy) and torch.equal(uncached, greedy), step
    bake_masks(model)  # masks still ramping live in hooks, not in the checkpoint: fold them in first
    path = tmp_path_factory.mktemp("grown")
    model.save_pretrained(path)
    reloaded = ArborForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert reloaded.config.layer_intermediate_sizes == model.config.layer_intermediate_sizes
    reloaded_logits, reloaded_greedy, _ = observe(reloaded, ids, mask)
    assert torch.equal(reloaded_logits, observe(model, ids, mask)[0])
    assert torch.equal(reloaded_greedy, greedy)


def test_training_after_each_growth_lowers_the_loss():
    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=64)).train()
    ids = torch.randint(0, 64, (4, 16))
    grows = [lambda: model.grow_depth(1), lambda: model.grow_width(192), lambda: model.grow_heads(8, 4),
             lambda: model.grow_hidden(96)]
    for grow in grows:
        with torch.no_grad():
            before = model(ids, labels=ids).loss.item()
        grow()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        with torch.no_grad():
            assert abs(model(ids, labels=ids).loss.item() - before) < 1e-4
        for _ in range(8):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert loss.item() < before


def test_depth_growth_renumbers_layers_and_reports_names():
    model = ArborForCausalLM(ArborConfig.from_preset("tiny"))
    event = model.grow_depth(2, positions=[1, 1])
    assert event.layers == [1, 2] and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert "model.layers.1.self_attn.q_proj.weight" in event.new_parameters
    assert event.renamed["model.layers.1.mlp.up_proj.weight"] == "model.layers.3.mlp.up_proj.weight"
    assert model.grow_depth(1).layers == [2]  # default: the middle of the stack


@pytest.mark.parametrize(
    ("grow", "message"),
    [
        (lambda m: m.grow_width(64), "shrink"),
        (lambda m: m.grow_heads(2), "shrink"),
        (lambda m: m.grow_heads(6, 4), "divide"),
        (lambda m: m.grow_heads(4, 4), "per group"),
        (lambda m: m.grow_hidden(32), "hidden_size"),
        (lambda m: m.grow_depth(20), "max_layers"),
        (lambda m: m.grow_depth(1, positions=[9]), "positions"),
        (lambda m: m.grow_width(256, layers=[5]), "layers"),
    ],
)
def test_invalid_growth_is_refused_without_touching_the_model(grow, message):
    model = ArborForCausalLM(ArborConfig.from_preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GrowthError, match=message):
        grow(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class EventLog:
    def __init__(self):
        self.events = []

    @arbor_plugins.hookimpl
    def arbor_grow_width(self, model, event):
        self.events.append(("width", event.axis))

    @arbor_plugins.hookimpl
    def arbor_grow_depth(self, model, event):
        self.events.append(("depth", event.axis))


def test_growth_fires_the_hooks():
    log = EventLog()
    get_plugin_manager().register(log, name="test-event-log")
    try:
        model = ArborForCausalLM(ArborConfig.from_preset("tiny"))
        model.grow_depth(1)
        model.grow_width(256)
        model.grow_heads(8)
        model.grow_hidden(128)
    finally:
        get_plugin_manager().unregister(log)
    assert log.events == [("depth", "depth"), ("width", "ffn"), ("width", "heads"), ("width", "hidden")]


def test_inserted_layers_inherit_gradient_checkpointing():
    model = ArborForCausalLM(ArborConfig.from_preset("tiny")).train()
    compat.enable_gradient_checkpointing(model)
    model.grow_depth(2)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ids = torch.randint(0, 100, (2, 8))
    model(ids, labels=ids).loss.backward()  # runs through the checkpointed new layers
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None
