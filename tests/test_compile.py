"""torch.compile with activation statistics on, and the Trainer's ``compile`` setting.

Statistics come from module hooks that exist only while a forward collects, so the model's
forward is one graph (``fullgraph=True``) in training mode with ``stats_interval`` on.
Compiling here uses the ``aot_eager`` backend (dynamo's full-graph capture plus AOTAutograd's
forward and backward graphs), and in the Trainer test a backend that records each graph dynamo
captures and runs it as captured: inductor's CPU code generation would take a minute or more per
graph and adds nothing to what these tests check.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM, compat
from arbor.model.modeling import CompiledForward
from arbor.plugins import get_plugin_manager
from arbor.training.trainer import TrainConfig, Trainer
from arbor_strategies.stats import layer_stats, layer_utilization


def tiny(**overrides) -> ArborForCausalLM:
    torch.manual_seed(0)
    sizes = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return ArborForCausalLM(ArborConfig.from_preset("tiny", **{**sizes, **overrides})).train()


class Recorder:
    """Every ``arbor_pre_forward_stats`` call, with a copy of the hidden states it was given."""

    def __init__(self):
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    @arbor_plugins.hookimpl
    def arbor_pre_forward_stats(self, model, layer_idx, hidden_states, step):
        assert not hidden_states.requires_grad
        self.calls.append((step, layer_idx, hidden_states.clone()))

    def keys(self) -> list[tuple[int, int]]:
        return [(step, layer) for step, layer, _ in self.calls]


@pytest.fixture
def recorder():
    pm = get_plugin_manager()
    rec = Recorder()
    pm.register(rec, name="test-compile-recorder")
    yield rec
    pm.unregister(rec)


def layer_hooks(model) -> int:
    return sum(len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in model.model.layers)


def inputs_as_the_forward_saw_them(model, ids) -> list[torch.Tensor]:
    """Each block's input, taken inside the decoder's layer loop as statistics used to be taken."""
    decoder = model.model
    embeds = decoder.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = compat.create_causal_mask(config=decoder.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                     position_ids=position_ids)
    rotary = decoder.rotary_emb(embeds, position_ids=position_ids)
    hidden, seen = embeds, []
    for layer in decoder.layers:
        seen.append(hidden.detach().clone())
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
    return seen


def test_hooks_exist_only_while_statistics_are_collected(recorder):
    model = tiny()
    ids = torch.randint(0, 48, (2, 6))
    assert len(model.model._forward_pre_hooks) == 0  # statistics off: no hooks anywhere
    model.stats_interval = 2
    assert len(model.model._forward_pre_hooks) == 1  # the one that counts training forwards
    seen_during = []
    probe = model.model.layers[0].register_forward_hook(lambda m, a, o: seen_during.append(layer_hooks(model)))
    for _ in range(3):
        model(ids)
    probe.remove()
    # forwards 0 and 2 collect: each layer gets its pre-hook (the decoder one that removes them)
    assert seen_during == [1 + 2, 1, 1 + 2]
    assert layer_hooks(model) == 0 and len(model.model._forward_hooks) == 0
    assert recorder.keys() == [(0, 0), (0, 1), (2, 0), (2, 1)] and model.model.stats_step == 3
    model.stats_interval = 0
    assert len(model.model._forward_pre_hooks) == 0


def test_hook_statistics_equal_the_layer_inputs_of_the_forward(recorder):
    model = tiny()
    model.stats_interval = 1
    ids = torch.randint(0, 48, (3, 7), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    want = inputs_as_the_forward_saw_them(model, ids)
    assert recorder.keys() == [(0, 0), (0, 1)]
    for (_, layer, got), expected, captured in zip(recorder.calls, want, out.hidden_states):
        assert torch.equal(got, expected), layer
        assert torch.equal(got, captured), layer  # transformers' own record of the layer inputs
    # the built-in collector reduces the same inputs
    stats = layer_stats(model).records
    assert sorted(stats) == [0, 1]
    reference = type(layer_stats(model))()
    for i, h in enumerate(want):
        reference.add(i, h)
    assert layer_utilization(model) == reference.utilization()


def test_new_layers_and_gradient_checkpointing(recorder):
    model = tiny()
    compat.enable_gradient_checkpointing(model)
    model.stats_interval = 1
    ids = torch.randint(0, 48, (2, 6))
    model(ids, labels=ids).loss.backward()  # the backward re-runs every layer's forward
    model.grow_depth(2, positions=[1, 1])
    model(ids, labels=ids).loss.backward()
    assert recorder.keys() == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]  # each layer once per forward
    assert layer_hooks(model) == 0
    assert len(layer_utilization(model)) == 4


def test_fullgraph_compile_trains_with_statistics_on(recorder):
    model = tiny()
    reference = tiny()
    model.stats_interval = reference.stats_interval = 1
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise here
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    want = reference(ids, labels=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # The compiled graph holds no statistics code: only the eager reference was observed, and the
    # compiled forward is not counted. (CompiledForward below keeps both.)
    assert [(s, i) for s, i, _ in recorder.calls] == [(0, 0), (0, 1)]
    assert recorder.calls[0][2].shape == (2, 8, 32)
    assert model.model.stats_step == 0 and reference.model.stats_step == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled(ids, labels=ids)  # the same graph serves again
    model(ids)  # and the eager model still collects
    assert len(recorder.calls) == 4 and layer_hooks(model) == 0


@pytest.mark.parametrize("axis", ["depth", "ffn"])
def test_fullgraph_compile_ramps_a_masked_step_as_eager_does(axis):
    # The masks' ramp advances inside the graph: no graph break, no recompilation per step, and
    # the losses and gradients of an eager twin, until the ramp is open and after.
    model = tiny()
    grow = {"depth": lambda m: m.grow_depth(1, init="masked", init_settings={"ramp_steps": 3}),
            "ffn": lambda m: m.grow_width(96, init="masked", init_settings={"ramp_steps": 3})}[axis]
    grow(model)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise here
    losses, want = [], []
    for step in range(5):
        stance = "fail_on_recompile" if step else "default"  # one graph serves the whole ramp
        with torch.compiler.set_stance(stance):
            loss = compiled(ids, labels=ids).loss
        loss.backward()
        expected = reference(ids, labels=ids).loss
        expected.backward()
        losses.append(loss.item())
        want.append(expected.item())
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"step {step}: {name}")
    assert losses == pytest.approx(want, rel=1e-6, abs=1e-7)
    # A training forward first moves the ramp: 1/3, 2/3, then open from the third forward on.
    assert len(set(losses[:3])) == 3 and losses[2] == losses[3] == losses[4]
    ramp = next(iter(getattr(model, "_arbor_masks")), None).ramp
    assert ramp.stale and ramp.value == 1.0  # read back from the graph's count
    assert not getattr(reference, "_arbor_masks")  # the eager twin dropped its open masks
    model(ids, labels=ids)  # so does the next eager forward of the compiled model
    assert not getattr(model, "_arbor_masks")


def test_compiled_forward_collects_what_an_eager_run_collects(recorder):
    eager, model = tiny(), tiny()
    eager.stats_interval = model.stats_interval = 2
    forward = CompiledForward(model, fullgraph=True, backend="aot_eager")
    batches = [torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(k)) for k in range(5)]
    results = {}
    for name, net, call in (("eager", eager, eager), ("compiled", model, forward)):
        recorder.calls.clear()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = []
        for ids in batches:  # the weights change between forwards, so each statistic tells its step apart
            loss = call(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        results[name] = (losses, list(recorder.calls), net.model.stats_step, layer_utilization(net))
    (eager_losses, eager_calls, eager_steps, eager_util), (losses, calls, steps, util) = results.values()
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert [c[:2] for c in calls] == [c[:2] for c in eager_calls] == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    for (_, _, got), (_, _, want) in zip(calls, eager_calls):
        torch.testing.assert_close(got, want)
    assert steps == eager_steps == 5
    assert util == pytest.approx(eager_util, rel=1e-5)


def train_blocks(n=40, seq=16, vocab=48):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n, seq), generator=g)
    data[:, 1::2] = (data[:, ::2] * 3 + 1) % vocab
    return data[: n - 8], data[n - 8:]


def run(tmp_path, compile: bool):
    train, val = train_blocks()
    # Utilization decides from statistics: the same step grows only if both runs collected the same.
    config = TrainConfig.model_validate(dict(
        max_steps=6, batch_size=4, seq_len=16, warmup_steps=1, lr=1e-2, eval_interval=6, save_interval=6,
        log_interval=1, compile=compile,
        growth={"trigger": "utilization", "step": {"axis": "depth", "num_layers": 1},
                "trigger_settings": {"threshold": 0.01, "fraction": 0.5, "cooldown": 100, "num_layers": 1,
                                     "history": 2, "stats_interval": 2}}))
    trainer = Trainer(tiny(), config, train, val, tmp_path, progress=False, echo=lambda s: None)
    summary = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r and "event" not in r]
    events = [(r["step"], r["layers"]) for r in lines if r.get("event") == "growth"]
    return trainer, summary, losses, events


def test_trainer_compile_repeats_the_eager_losses_across_a_growth_step(tmp_path, monkeypatch):
    graphs = []

    def backend(gm, example_inputs):  # dynamo's capture, run as captured; records each graph's size
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(Trainer, "compile_options", {"backend": backend, "fullgraph": True})
    eager, eager_summary, eager_losses, eager_events = run(tmp_path / "eager", compile=False)
    compiled, summary, losses, events = run(tmp_path / "compiled", compile=True)
    assert eager_events and events == eager_events  # one growth step, at the same step
    assert summary["layers"] == eager_summary["layers"] == 3
    assert len(losses) == 6 and losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert summary["val_loss"] == pytest.approx(eager_summary["val_loss"], rel=1e-5)
    assert compiled.model.model.stats_step == eager.model.model.stats_step == 6
    assert compiled._compiled is not None and compiled._compiled.model is compiled.model
    # Steps 2 and 4 compile (steps 1, 3 and 5 collect statistics, eagerly): 2 layers, then 3 after step 3.
    assert len(graphs) == 2 and graphs[1] > graphs[0]
    assert layer_utilization(compiled.model) == pytest.approx(layer_utilization(eager.model), rel=1e-5)


def test_compile_flag_sets_the_setting():
    from arbor.cli import build_parser
    from arbor.cli.train import build_config

    args = build_parser().parse_args(["train", "--compile", "--max-steps", "3"])
    assert build_config(args).compile is True
    assert build_config(build_parser().parse_args(["train"])).compile is False
