"""Freezing by selector (`arbor.growth.freezing`).

Every selector form resolves to the expected parameter names, bad selectors
fail with an error naming the problem, frozen tensors never move (not by
weight decay, not by momentum gathered before freezing) and hold no optimizer
state, the rest still learns, the ``arbor_freeze`` hook hears about each
change, and frozen parts stay frozen across growth.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.freezing import FreezeError, freeze, select_parameters, unfreeze


def tiny(**overrides) -> ArborForCausalLM:
    cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8)
    return ArborForCausalLM(ArborConfig(**{**cfg, **overrides}))


def layer(i: int) -> list[str]:
    return [f"model.layers.{i}.{n}.weight" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]


def batch() -> torch.Tensor:
    return torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))


def train(model, opt, steps: int, set_to_none: bool = True) -> list[float]:
    x, losses = batch(), []
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


EMBED, HEAD, NORM = ["model.embed_tokens.weight"], ["lm_head.weight"], ["model.norm.weight"]
MLPS = [n for i in range(3) for n in layer(i) if ".mlp." in n]


@pytest.mark.parametrize("selectors, kwargs, expected", [
    (["embeddings"], {"embeddings": True}, EMBED),
    (["lm_head"], {"lm_head": True}, HEAD),
    (["norm"], {"norm": True}, NORM),
    (["layers:2"], {"layers": 2}, layer(2)),
    (["layers:0-1"], {"layers": range(2)}, layer(0) + layer(1)),
    (["layers:0,2"], {"layers": [2, 0]}, layer(0) + layer(2)),
    (["all-but-newest:1"], {"all_but_newest": 1}, layer(0) + layer(1)),  # equal generations: higher index is newer
    (["newest:1"], {"newest": 1}, layer(2)),
    (["newest:0"], {"newest": 0}, []),
    (["newest:9"], {"all_but_newest": 0}, layer(0) + layer(1) + layer(2)),  # counts are clamped to the stack
    (["name:model.layers.*.mlp.*"], {"pattern": "model.layers.*.mlp.*"}, MLPS),
    (["name:model.norm.*", "name:lm_head.*"], {"pattern": ["lm_head.*", "model.norm.*"]}, NORM + HEAD),
    ([" Layers : 1 ", "NORM"], {"layers": [1], "norm": True}, layer(1) + NORM),
])
def test_selectors_resolve(selectors, kwargs, expected):
    model = tiny()
    assert select_parameters(model, *selectors) == expected
    assert select_parameters(model, **kwargs) == expected


def test_all_and_unions_keep_model_order():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert select_parameters(model, "all") == names
    assert select_parameters(model, "norm", "embeddings", layers=1) == EMBED + layer(1) + NORM
    assert select_parameters(model, "layers:0-1", newest=2) == layer(0) + layer(1) + layer(2)


def test_tied_head_is_the_embedding():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert select_parameters(model, "lm_head") == EMBED
    assert select_parameters(model, pattern="lm_head.weight") == EMBED
    model.freeze("lm_head")
    assert model.frozen_parameters() == EMBED and not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("args, kwargs, match", [
    (["layers:3"], {}, r"'layers:3'.*layer 3 is out of range.*indices 0 to 2"),
    (["layers:2-0"], {}, r"'layers:2-0'.*runs backwards"),
    (["layers:x"], {}, r"'layers:x'.*'x' is not a layer index"),
    (["layers"], {}, r"'layers' needs a value"),
    (["newest:two"], {}, r"'newest:two'.*'two' must be a number of layers"),
    (["bogus"], {}, r"unknown selector 'bogus'.*allowed forms.*all-but-newest:K"),
    (["norm:1"], {}, r"'norm' takes no value"),
    (["name:model.nothing.*"], {}, r"pattern 'model.nothing.\*' matches no parameter"),
    ([3], {}, r"selector 3 is invalid: selectors are strings"),
    ([], {}, r"no selector given"),
    ([], {"layers": 5}, r"layers=5 is invalid.*the model has 3 layers, indices 0 to 2"),
    ([], {"layers": [0, -1]}, r"layers=\[0, -1\] is invalid"),
    ([], {"layers": "0-2"}, r"layers='0-2' is invalid"),
    ([], {"newest": -1}, r"newest=-1 is invalid: must be an integer >= 0"),
    ([], {"all_but_newest": 1.5}, r"all_but_newest=1.5 is invalid"),
    ([], {"embeddings": "yes"}, r"embeddings='yes' is invalid: must be True or False"),
    ([], {"pattern": []}, r"pattern=\[\] is invalid"),
])
def test_bad_selectors_name_the_problem(args, kwargs, match):
    with pytest.raises(FreezeError, match=match):
        select_parameters(tiny(), *args, **kwargs)


def test_freeze_is_a_value_error_and_changes_nothing_on_error():
    model = tiny()
    with pytest.raises(ValueError):
        model.freeze("layers:0", "name:nope*")
    assert model.frozen_parameters() == []


@pytest.mark.parametrize("make_opt, set_to_none", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), True),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01), False),
], ids=["adamw", "sgd-momentum"])
def test_frozen_parameters_do_not_move(make_opt, set_to_none):
    model = tiny()
    opt = make_opt(model.parameters())
    train(model, opt, 3, set_to_none)  # momentum exists and .grad is set before freezing
    names = model.freeze("layers:0-1", optimizer=opt)
    assert names == layer(0) + layer(1) == model.frozen_parameters()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    train(model, opt, 3, set_to_none)
    for name, p in params.items():
        if name in names:
            assert torch.equal(p, before[name]), name
            assert p not in opt.state and p.grad is None, name
        else:
            assert not torch.equal(p, before[name]), name
            assert p in opt.state, name


def test_loss_goes_down_training_only_the_unfrozen_part():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    model.freeze("embeddings", all_but_newest=1, optimizer=opt)
    losses = train(model, opt, 8)
    assert losses[-1] < losses[0] - 0.1


def test_unfreeze_trains_again_and_joins_the_optimizer():
    model = tiny()
    model.freeze(layers=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert model.unfreeze("layers:0-1", optimizer=opt) == layer(0)  # layer 1 was never frozen
    assert model.frozen_parameters() == []
    q = model.model.layers[0].self_attn.q_proj.weight
    assert any(p is q for p in opt.param_groups[0]["params"])
    before = q.detach().clone()
    train(model, opt, 1)
    assert not torch.equal(q, before)


class _BufferEmbedding(nn.Module):
    """A frozen substrate's module: the matrix is a buffer, not a parameter."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(vocab, hidden))

    def forward(self, ids):
        return nn.functional.embedding(ids, self.weight)


def test_frozen_substrate_cannot_be_unfrozen():
    model = tiny()
    model.model.embed_tokens = _BufferEmbedding(32, 16)
    assert select_parameters(model, "embeddings") == []
    assert model.freeze("embeddings") == []  # already frozen by design: nothing to do
    for args, kwargs in ((["embeddings"], {}), ([], {"embeddings": True})):
        with pytest.raises(FreezeError, match="frozen by design.*buffer"):
            model.unfreeze(*args, **kwargs)
    model.freeze("all")
    assert model.unfreeze("all") == [n for n, _ in model.named_parameters()]


def test_freeze_hook_gets_changed_names_and_flag(fresh_plugins):
    from arbor.plugins import get_plugin_manager

    calls = []

    class Listener:
        @arbor_plugins.hookimpl
        def arbor_freeze(self, model, names, frozen):
            calls.append((list(names), frozen))

    get_plugin_manager().register(Listener())
    model = tiny()
    freeze(model, layers=0)
    freeze(model, "layers:0-1")  # layer 0 is frozen already: only layer 1 is news
    freeze(model, "layers:1")  # nothing changes: no call
    unfreeze(model, "all")
    assert calls == [(layer(0), True), (layer(1), True), (layer(0) + layer(1), False)]


def test_newest_follows_generations_after_depth_growth():
    model = tiny()
    model.grow_depth(2, positions=[0, 3])  # new layers at 0 and 4; old ones move to 1..3
    assert model.config.layer_generations == [1, 0, 0, 0, 1]
    assert select_parameters(model, all_but_newest=2) == layer(1) + layer(2) + layer(3)
    assert select_parameters(model, "newest:2") == layer(0) + layer(4)
    assert select_parameters(model, "newest:1") == layer(4)  # same generation: higher index is newer
    model.grow_depth(1, positions=[2])  # generation 2 sits in the middle
    assert select_parameters(model, "newest:1") == layer(2)
    assert select_parameters(model, "newest:3") == layer(0) + layer(2) + layer(5)


def test_frozen_prefix_stays_frozen_across_growth():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 2)
    model.freeze("embeddings", "layers:0", optimizer=opt)
    frozen = EMBED + layer(0)
    model.grow_width(48, optimizer=opt)
    model.grow_hidden(24, optimizer=opt)
    model.grow_heads(4, optimizer=opt)
    assert model.frozen_parameters() == frozen
    model.grow_depth(1, positions=[0], optimizer=opt)  # the frozen layer moves to index 1; the new one trains
    assert model.frozen_parameters() == EMBED + layer(1)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in model.frozen_parameters()}
    train(model, opt, 2)
    for name, value in before.items():
        assert torch.equal(params[name], value) and params[name] not in opt.state, name
