"""One growth transaction: model.grow(), the Trainer, GrowthCallback and `arbor grow` take the same step.

For random sequences of growth steps (every axis, exact and non-exact inits),
each entry point must leave bitwise-identical parameters and optimizer state,
and the Trainer and the callback must write the same records.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import TrainerState

from arbor import ArborConfig, ArborForCausalLM
from arbor.cli import main
from arbor.growth.step import GrowthStep, Operation, describe_growth
from arbor.training.integrations import GrowthCallback
from arbor.plugins.selection import Selection
from arbor.training.trainer import TrainConfig, Trainer
from arbor_plugins.components import Decision

VOCAB, SEQ = 48, 12


def fresh_model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, num_key_value_heads=2))


BATCH = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))

OFFLINE_STEPS = [
    {"axis": "depth", "num_layers": 1},
    {"axis": "depth", "num_layers": 2, "init": "stack"},
    {"axis": "depth", "num_layers": 1, "policy": "top"},
    {"axis": "ffn", "add": 16},
    {"axis": "ffn", "add": 8, "init": "split"},
    {"axis": "heads", "add": 4, "add_kv": 2},  # query and kv heads stay 2:1, so any sequence is valid
    {"axis": "heads", "add": 4, "add_kv": 2, "init": "split"},
    {"axis": "hidden", "add": 8},
]
# masked ramps new parts in over training forwards, so `arbor grow` (offline) refuses it
STEPS = st.sampled_from([*OFFLINE_STEPS, {"axis": "ffn", "add": 8, "init": "masked", "init_settings": {"ramp_steps": 3}},
                         {"axis": "depth", "num_layers": 1, "init": "masked", "init_settings": {"ramp_steps": 2}}])


def train_step(model, optimizer) -> None:
    torch.manual_seed(2)  # the same random draws (none today) on every path
    model.train()
    model(BATCH, labels=BATCH).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def snapshot(model, optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "state": state, "groups": groups,
            "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad)}


def assert_same(a: dict, b: dict, label: str) -> None:
    assert a["params"].keys() == b["params"].keys(), label
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), f"{label}: parameter {name}"
    assert a["state"].keys() == b["state"].keys(), label
    for name, s in a["state"].items():
        assert s.keys() == b["state"][name].keys(), f"{label}: state keys of {name}"
        for key, value in s.items():
            other = b["state"][name][key]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, f"{label}: optimizer state {key} of {name}"
    assert a["groups"] == b["groups"] and a["frozen"] == b["frozen"], label


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def run_model_grow(specs):
    model = fresh_model()
    opt = optimizer_for(model)
    train_step(model, opt)
    for spec in specs:
        model.grow(spec, plugins=Selection(), optimizer=opt)
        train_step(model, opt)
    return snapshot(model, opt), None


def run_trainer(specs, out: Path):
    model = fresh_model()
    config = TrainConfig.model_validate({"max_steps": 100, "batch_size": 4, "seq_len": SEQ,
                                         "growth": {"trigger": "schedule", "trigger_settings": {"steps": [50]}}})
    trainer = Trainer(model, config, BATCH, BATCH[:2], out, plugins=Selection(), progress=False, echo=lambda s: None)
    trainer.optimizer = opt = optimizer_for(model)  # the same optimizer as the other paths
    train_step(model, opt)
    records = []
    for i, spec in enumerate(specs):
        trainer.step, trainer.tokens = i + 1, (i + 1) * 48
        records.append(trainer.grow(Decision(True, f"step {i}", spec)))
        train_step(model, opt)
    return snapshot(model, opt), records


def run_callback(specs):
    model = fresh_model()
    opt = optimizer_for(model)
    callback = GrowthCallback(trigger="schedule", trigger_settings={"steps": [50]}, plugins=Selection(),
                              probe_batch=BATCH[:2], echo=lambda s: None)
    args = SimpleNamespace(world_size=1, deepspeed=None, fsdp=None, include_num_input_tokens_seen=False,
                           train_batch_size=4, gradient_accumulation_steps=1)
    callback.on_train_begin(args, TrainerState(max_steps=100), None, model=model, optimizer=opt)
    train_step(model, opt)
    records = []
    for i, spec in enumerate(specs):
        records.append(callback.grow(Decision(True, f"step {i}", spec), i + 1, (i + 1) * 48, opt, None))
        train_step(model, opt)
    return snapshot(model, opt), records


def cli_flags(model, spec) -> list[str]:
    c = model.config
    init = ["--init", spec["init"]] if "init" in spec else []
    if spec["axis"] == "depth":
        policy = ["--policy", spec["policy"]] if "policy" in spec else []
        return ["--depth", str(spec["num_layers"]), *policy, *init]
    if spec["axis"] == "ffn":
        return ["--width", str(max(c.layer_intermediate_sizes) + spec["add"]), *init]
    if spec["axis"] == "heads":
        kv = ["--kv-heads", str(c.layer_num_key_value_heads[0] + spec["add_kv"])] if spec.get("add_kv") else []
        return ["--heads", str(c.layer_num_attention_heads[0] + spec["add"]), *kv, *init]
    return ["--hidden", str(c.hidden_size + spec["add"]), *init]


@given(st.lists(STEPS, min_size=1, max_size=3))
def test_every_entry_point_takes_the_same_step(specs):
    reference, _ = run_model_grow(specs)
    with tempfile.TemporaryDirectory() as out:
        trained, trainer_records = run_trainer(specs, Path(out))
    assert_same(reference, trained, "Trainer.grow vs model.grow")
    called, callback_records = run_callback(specs)
    assert_same(reference, called, "GrowthCallback.grow vs model.grow")
    assert [comparable(r) for r in trainer_records] == [comparable(r) for r in callback_records]
    for record, spec in zip(trainer_records, specs):
        assert record["spec"] == spec and record["axis"] == spec["axis"]
        assert record["exact"] == (spec.get("init") != "stack")  # masked is exact: its ramp starts at 0
        assert record["exact"] is False or record["loss_before"] == pytest.approx(record["loss_after"], abs=1e-5)


@given(st.lists(st.sampled_from(OFFLINE_STEPS), min_size=1, max_size=2))
def test_arbor_grow_takes_the_step_model_grow_takes(specs):
    model = fresh_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-0"
        model.save_pretrained(path)
        for i, spec in enumerate(specs):
            out = Path(tmp) / f"step-{i + 1}"
            assert main(["grow", str(path), "--out", str(out), *cli_flags(model, spec)]) == 0
            torch.manual_seed(0)  # what `arbor grow --seed 0` (the default) draws from
            model.grow(spec, plugins=Selection())
            path = out
        grown = ArborForCausalLM.from_pretrained(path)
    ignore = {"architectures": None, "_name_or_path": None}
    assert grown.config.to_dict() | ignore == model.config.to_dict() | ignore
    loaded = dict(grown.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, loaded[name]), name


def test_a_step_whose_probe_moves_is_recorded_as_not_exact():
    class Liar:  # claims exactness and breaks it
        name, exact, axes = "liar", True, ("ffn",)

        def initialize(self, model, event, settings):
            for i in event.layers:
                model.model.layers[i].mlp.down_proj.weight.add_(1.0)

    model = fresh_model()

    @torch.no_grad()
    def probe() -> float:
        return float(model(BATCH, labels=BATCH).loss)

    result = GrowthStep(plugins=Selection())(model, copy.deepcopy({"axis": "ffn", "add": 8}), probe=probe)
    assert result.record["exact"] and "claimed_exact" not in result.record
    result = GrowthStep(plugins=Selection())(model, Operation("ffn", 96, init=Liar()), probe=probe, step=3)
    assert result.record["exact"] is False and result.record["claimed_exact"] is True
    assert describe_growth(result.record).startswith("step 3: grew ffn (liar, not exact)")


def test_the_record_says_where_new_layers_went():
    model = fresh_model()
    result = GrowthStep(plugins=Selection())(model, {"axis": "depth", "num_layers": 2, "positions": [0, 2]})
    assert result.record["positions"] == result.event.layers and result.record["layers"] == 4
    assert result.record["layers_before"] == 2
