"""Optimizer carry-over across growth steps (`arbor.growth.optim`).

The state of old units must survive growth untouched (old slices equal, new
slices zero, ``step`` kept), new layers train in their own group with a scaled
lr and optional warm-up, schedulers keep stepping, frozen tensors hold no
state and never move, and training keeps lowering the loss after growth.
"""

from __future__ import annotations

import copy

import pytest
import torch

import arbor
from arbor.growth.operators import add_heads, insert_layers, widen_hidden, widen_mlp
from arbor.growth.optim import carry_over, drop_frozen_state, step_warmup

GROW = {
    "ffn": lambda m: widen_mlp(m, 64),
    "heads": lambda m: add_heads(m, 8),  # group size 2 -> 4: old heads are permuted
    "heads_kv": lambda m: add_heads(m, 8, 4),  # new kv heads too
    "hidden": lambda m: widen_hidden(m, 48),
    "depth": lambda m: insert_layers(m, [1, 2]),
}


def tiny(**overrides) -> arbor.ArborForCausalLM:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(overrides)
    return arbor.ArborForCausalLM(arbor.ArborConfig(**cfg))


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def loss_of(model, x) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def train(model, opt, x, steps: int, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        step_warmup(opt)
        losses.append(loss.item())
    return losses


def snapshot(model, opt) -> dict[str, dict]:
    return {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for n, p in model.named_parameters() if p in opt.state}


def old_mask(info) -> torch.Tensor:
    mask = torch.zeros(info.new_shape, dtype=torch.bool)
    mask[info.old_index()] = True
    return mask


@pytest.mark.parametrize("axis", list(GROW))
def test_state_carried_into_new_shapes(axis):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = batch()
    train(model, opt, x, 2)
    snap = snapshot(model, opt)
    event = GROW[axis](model)
    report = carry_over(opt, model, event, new_param_lr_multiplier=0.5)
    back = {new: old for old, new in event.renamed.items()}
    assert report["resized"].keys() == {n for n in event.resized if n in snap}
    held = {p for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert p in held, name
        if name in event.new_parameters:
            assert p not in opt.state
            continue
        old = snap[back.get(name, name)]
        state = opt.state[p]
        assert state["step"] == old["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape, (name, key)
            if name in event.resized:
                info = event.resized[name]
                assert torch.equal(state[key][info.old_index()], old[key]), (name, key)
                assert not state[key][~old_mask(info)].any(), (name, key)
            else:
                assert torch.equal(state[key], old[key]), (name, key)
    if event.new_parameters:
        group = opt.param_groups[report["new_group"]]
        assert report["new_group"] == len(opt.param_groups) - 1 == 1
        assert group["lr"] == pytest.approx(0.5e-2) and group["arbor_lr_multiplier"] == 0.5
        assert group["weight_decay"] == 0.1
        assert {id(p) for p in group["params"]} == {id(p) for n, p in model.named_parameters()
                                                     if n in event.new_parameters}
    else:
        assert len(opt.param_groups) == 1
    losses = train(model, opt, x, 4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_grow_methods_carry_over_through_the_model_api():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 2)
    model.grow_width(64, optimizer=opt)
    model.grow_depth(1, optimizer=opt, new_param_lr_multiplier=3.0)
    for p in model.parameters():
        if p in opt.state:
            assert opt.state[p]["exp_avg"].shape == p.shape
    assert opt.param_groups[-1]["lr"] == pytest.approx(3e-2)
    train(model, opt, batch(), 2)


@pytest.mark.parametrize("tied", [True, False])
def test_model_api_hands_each_tensor_over_at_once(tied, monkeypatch):
    # Old parameters and their old-shaped moments are freed as the step goes, not at its end:
    # that is what keeps peak memory near the size of what growth adds.
    import gc
    import weakref

    from arbor.growth import operators as growth

    model = tiny(tie_word_embeddings=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 1)
    embed = model.model.embed_tokens.weight
    old_param, old_moment = weakref.ref(embed), weakref.ref(opt.state[embed]["exp_avg"])
    del embed
    seen = []
    real = growth._set_linear_shape

    def spy(linear):  # runs inside widen_hidden after each projection grows; the embedding grows first
        gc.collect()
        seen.append(old_param() is None and old_moment() is None)
        real(linear)

    monkeypatch.setattr(growth, "_set_linear_shape", spy)
    model.grow_hidden(48, optimizer=opt)
    assert seen and seen[0]  # by the first projection, the old embedding and its moment are gone
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("axis", ["ffn", "depth", "hidden"])
def test_frozen_parameters_hold_no_state_and_do_not_move(axis):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = batch()
    train(model, opt, x, 2)  # leaves .grad set: a stale gradient must not move frozen weights
    frozen = [model.model.embed_tokens.weight, *model.model.layers[0].parameters()]
    for p in frozen:
        p.requires_grad_(False)
    event = GROW[axis](model)
    carry_over(opt, model, event)
    frozen = [p for p in model.parameters() if not p.requires_grad]  # grown tensors are new objects
    assert len(frozen) >= 10
    before = [p.detach().clone() for p in frozen]
    train(model, opt, x, 2)
    for p, b in zip(frozen, before):
        assert p not in opt.state
        assert torch.equal(p, b)


def test_drop_frozen_state():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 1)
    layer = model.model.layers[1]
    for p in layer.parameters():
        p.requires_grad_(False)
    assert drop_frozen_state(opt) == len(list(layer.parameters()))
    assert all(p not in opt.state and p.grad is None for p in layer.parameters())
    before = [p.detach().clone() for p in layer.parameters()]
    train(model, opt, batch(), 1)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))


def test_new_layers_frozen_are_left_out():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 1)
    event = insert_layers(model, [1])
    for name, p in model.named_parameters():
        if name in event.new_parameters and "mlp" in name:
            p.requires_grad_(False)
    report = carry_over(opt, model, event)
    assert report["new_parameters"] and all("mlp" not in n for n in report["new_parameters"])
    held = {p for g in opt.param_groups for p in g["params"]}
    assert all(p not in held for n, p in model.named_parameters() if "layers.1.mlp" in n)


def test_warmup_reaches_target():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 1)
    carry_over(opt, model, insert_layers(model, [1]), new_param_lr_multiplier=2.0, warmup_steps=4)
    group = opt.param_groups[-1]
    seen = [group["lr"]]
    for _ in range(6):
        train(model, opt, batch(), 1)
        seen.append(group["lr"])
    assert seen == pytest.approx([0.005, 0.01, 0.015, 0.02, 0.02, 0.02, 0.02])
    assert group["arbor_warmup"]["done"] == 4
    assert opt.param_groups[0]["lr"] == 1e-2


def _cosine(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)


@pytest.mark.parametrize("make", [lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s), _cosine],
                         ids=["lambda", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_scheduler_keeps_working(make, warmup):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make(opt)
    train(model, opt, batch(), 2, sched)
    carry_over(opt, model, insert_layers(model, [1]), new_param_lr_multiplier=2.0,
               warmup_steps=warmup, scheduler=sched)
    base, new = opt.param_groups[0], opt.param_groups[-1]
    assert new["initial_lr"] == pytest.approx(2 * base["initial_lr"])
    assert len(sched.base_lrs) == len(sched.get_last_lr()) == len(opt.param_groups) == 2
    for k in range(4):
        ramp = min(1.0, (k + 1) / warmup) if warmup else 1.0
        assert new["lr"] == pytest.approx(2.0 * ramp * base["lr"]), k
        train(model, opt, batch(), 1, sched)


def test_other_schedulers_get_per_group_entries():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, batch(), 1, sched)
    carry_over(opt, model, insert_layers(model, [1]), new_param_lr_multiplier=4.0, warmup_steps=2, scheduler=sched)
    for _ in range(3):
        train(model, opt, batch(), 1, sched)
        assert opt.param_groups[1]["lr"] == pytest.approx(4 * opt.param_groups[0]["lr"])


@pytest.mark.parametrize("axis", ["ffn", "heads_kv", "hidden", "depth"])
def test_sgd_momentum_and_amsgrad(axis):
    for make, keys in ((lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), ("momentum_buffer",)),
                       (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
                        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))):
        model = tiny()
        opt = make(model.parameters())
        x = batch()
        train(model, opt, x, 2)
        snap = snapshot(model, opt)
        event = GROW[axis](model)
        carry_over(opt, model, event)
        for name, info in event.resized.items():
            p = dict(model.named_parameters())[name]
            for key in keys:
                assert opt.state[p][key].shape == p.shape
                assert torch.equal(opt.state[p][key][info.old_index()], snap[name][key])
                assert not opt.state[p][key][~old_mask(info)].any()
        losses = train(model, opt, x, 3)
        assert losses[-1] < losses[0]


def test_moment_scales_applied():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 2)
    snap = snapshot(model, opt)
    event = widen_mlp(model, 64, layers=[0])
    name = "model.layers.0.mlp.up_proj.weight"
    rows = torch.ones(48, 1)
    rows[:8] = 0.5  # as if units 0..7 were duplicated
    event.moment_scales[name] = (rows, rows * rows)
    carry_over(opt, model, event)
    state = opt.state[dict(model.named_parameters())[name]]
    assert torch.equal(state["exp_avg"][:48], snap[name]["exp_avg"] * rows)
    assert torch.equal(state["exp_avg_sq"][:48], snap[name]["exp_avg_sq"] * rows * rows)


class _Odd(torch.optim.SGD):
    """An unknown optimizer keeping a state tensor of another shape (like Adafactor's row statistics)."""

    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st.setdefault("row", torch.zeros(p.shape[0] + 1))
                    st.setdefault("same", torch.zeros_like(p)).add_(p.grad)
        return super().step(closure)


def test_unknown_optimizer_resizes_same_shape_and_warns_on_others():
    model = tiny()
    opt = _Odd(model.parameters(), lr=1e-2)
    train(model, opt, batch(), 1)
    with pytest.warns(RuntimeWarning, match="cannot be carried over"):
        report = carry_over(opt, model, widen_mlp(model, 64))
    assert report["restarted"] and all(dict(model.named_parameters())[n] not in opt.state
                                       for n in report["restarted"])
    train(model, opt, batch(), 1)


def _one_step_matches_ungrown(axis, make_opt):
    """Grow exactly, carry over, take one step: old slices must move as without growth."""
    model = tiny()
    opt = make_opt(model.parameters())
    x = batch()
    train(model, opt, x, 2)
    ref = copy.deepcopy(model)
    ref_opt = make_opt(ref.parameters())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # "step" tensors would be shared otherwise
    train(ref, ref_opt, x, 1)
    event = GROW[axis](model)
    carry_over(opt, model, event)
    train(model, opt, x, 1)
    back = {new: old for old, new in event.renamed.items()}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name in event.new_parameters:
            continue
        value = p.detach()[event.resized[name].old_index()] if name in event.resized else p.detach()
        torch.testing.assert_close(value, ref_params[back.get(name, name)].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("axis", ["ffn", "depth", "heads", "heads_kv"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_one_step_after_exact_growth_equals_step_without_growth(axis, opt):
    # Zero-init outgoing weights make new units invisible to the loss AND to the
    # backward pass of old units (their Jacobian contribution is multiplied by
    # zero), so old gradients are unchanged; SGD and Adam(W) are elementwise, so
    # with carried-over state the old slices take exactly the same step.
    # Hidden growth is excluded: it rescales the norm gains, so old values change.
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}[opt]
    _one_step_matches_ungrown(axis, make)
