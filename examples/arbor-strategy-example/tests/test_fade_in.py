"""The fade-in init scheme: exact when it grows, opening with training, and resumable through its saved state."""

from __future__ import annotations

import torch

from arbor_plugins.testing import check_init_scheme
from arbor_strategy_example import FadeInInit, arbor_load_state, arbor_state_dict
from arbor_strategy_example.fade_in import STATE_KEY, gates

SCHEME = FadeInInit()
BATCH = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))


def grow(model, steps=4):
    from arbor.growth.operators import insert_layers

    return insert_layers(model, [1], init=SCHEME, init_settings={"steps": steps})


def train_forward(model):
    model.train()
    model(BATCH, labels=BATCH).loss.backward()


def test_conformance_kit():
    assert check_init_scheme(SCHEME, settings={"steps": 3}).passed


def test_growing_is_exact_and_the_gate_opens_with_training(arbor_tiny_model):
    model = arbor_tiny_model.eval()
    with torch.no_grad():
        before = model(BATCH).logits
        grow(model)
        assert torch.equal(model(BATCH).logits, before)  # the gate starts closed; eval forwards do not move it
    (gate,) = gates(model)
    for done in range(1, 5):
        train_forward(model)
        assert gate.done == done
    assert gates(model) == [] and gate.handles == []  # open: the hooks are gone


def test_its_state_goes_into_a_checkpoint_and_comes_back(arbor_tiny_model, tmp_path):
    model = arbor_tiny_model
    grow(model, steps=6)
    train_forward(model)
    train_forward(model)
    state = arbor_state_dict(model)
    assert state == {STATE_KEY: [{"layer": "model.layers.1", "steps": 6, "done": 2}]}
    model.save_pretrained(tmp_path)
    resumed = type(model).from_pretrained(tmp_path)  # the weights, without the gate
    arbor_load_state(resumed, state)
    model.eval(), resumed.eval()
    with torch.no_grad():
        assert torch.equal(model(BATCH).logits, resumed(BATCH).logits)
    train_forward(model), train_forward(resumed)
    assert [g.done for g in gates(resumed)] == [g.done for g in gates(model)] == [3]
