"""GrowthCallback: growth inside a real ``transformers.Trainer``, optimizer and schedule carried over."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from arbor import ArborConfig, ArborForCausalLM, compat
from arbor.training.integrations import GrowthCallback, prepare_resume, unwrap_optimizer

SEQ, VOCAB = 16, 48


class Blocks(torch.utils.data.Dataset):
    """Token blocks where every second token follows from the one before: learnable in a few steps."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.data[:, 1::2] = (self.data[:, ::2] * 3 + 1) % VOCAB

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def arguments(tmp_path, **overrides) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(overrides)
    return TrainingArguments(**base)


class Inspector(TrainerCallback):
    """Checks, after every step, that the optimizer the Trainer steps matches the model."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        inner = unwrap_optimizer(optimizer)
        held = [p for g in optimizer.param_groups for p in g["params"]]  # seen through the accelerate wrapper
        assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(set(map(id, held)))
        for p in held:
            for key in ("exp_avg", "exp_avg_sq"):
                if p in inner.state:
                    assert inner.state[p][key].shape == p.shape, key
        groups = len(inner.param_groups)
        assert len(lr_scheduler.lr_lambdas) == len(lr_scheduler.base_lrs) == len(lr_scheduler.get_last_lr()) == groups
        self.steps.append({"step": state.global_step, "groups": groups, "layers": model.config.num_hidden_layers,
                           "lrs": [g["lr"] for g in inner.param_groups],
                           "with_state": sum(p in inner.state for p in held), "params": len(held)})


def train(tmp_path, callback, args=None, model=None):
    inspector = Inspector()
    model = model or tiny_model()
    trainer = Trainer(model=model, args=args or arguments(tmp_path), train_dataset=Blocks(),
                      callbacks=[callback, inspector])
    trainer.train()
    return trainer, inspector


def losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_scheduled_depth_growth_carries_adam_state_and_the_schedule(tmp_path):
    probe = Blocks().data[:2]
    lines = []
    grow = GrowthCallback(trigger="schedule", trigger_settings={"steps": [4, 8]},
                          growth={"axis": "depth", "num_layers": 1}, new_param_lr_multiplier=2.0,
                          probe_batch=probe, log_path=tmp_path / "growth.jsonl", echo=lines.append)
    params_before = sum(p.numel() for p in tiny_model().parameters())
    trainer, seen = train(tmp_path, grow)
    model = trainer.model

    events = [r for r in trainer.state.log_history if r.get("event") == "growth"]
    assert [e["step"] for e in events] == [4, 8] and model.config.num_hidden_layers == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "growth.jsonl").read_text().splitlines()] == [4, 8]
    assert len(lines) == 2 and "scheduled growth 1/2 at step 4" in lines[0]
    for e in events:  # exact: the probe loss is the same right before and right after
        assert e["exact"] and abs(e["loss_after"] - e["loss_before"]) < 1e-5
        assert e["params"] > e["params_before"] and e["layers"] == e["layers_before"] + 1
    assert sum(p.numel() for p in model.parameters()) == events[-1]["params"] > params_before

    # One new group per depth step, stepped by the Trainer from the next step on: every parameter has
    # Adam state of its own shape, and the old ones kept their step count (no restart).
    by_step = {s["step"]: s for s in seen.steps}
    assert [by_step[k]["groups"] for k in (3, 4, 5, 8, 12)] == [2, 3, 3, 4, 4]
    assert by_step[12]["with_state"] == by_step[12]["params"]
    inner = unwrap_optimizer(trainer.optimizer)
    steps = sorted({int(inner.state[p]["step"]) for g in inner.param_groups for p in g["params"]})
    assert steps == [4, 8, 12]  # new since step 8, since step 4, from the start
    # The LambdaLR drives the new groups too, at twice the base lr.
    for s in seen.steps[4:]:
        assert s["lrs"][2] == pytest.approx(2 * s["lrs"][0])
    first, last = losses(trainer)[:3], losses(trainer)[-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.2


def test_width_growth_resizes_adam_state_in_place(tmp_path):
    grow = GrowthCallback(trigger_settings={"steps": [5]}, growth={"axis": "ffn", "factor": 1.5},
                          probe_batch={"input_ids": Blocks().data[:2]}, echo=lambda line: None)
    trainer, seen = train(tmp_path, grow, arguments(tmp_path, max_steps=8))
    model = trainer.model
    assert model.config.layer_intermediate_sizes == [96, 96]
    (event,) = grow.history
    assert event["axis"] == "ffn" and abs(event["loss_after"] - event["loss_before"]) < 1e-5
    assert {s["groups"] for s in seen.steps} == {2}  # nothing new to group: the resized tensors keep theirs
    inner = unwrap_optimizer(trainer.optimizer)
    up = model.model.layers[0].mlp.up_proj.weight
    assert up.shape == (96, 32) and inner.state[up]["exp_avg"].shape == (96, 32) and int(inner.state[up]["step"]) == 8


def test_default_schedule_warmup_and_tokens(tmp_path):
    # No settings: grow where arbor train does, at 10 % and 30 % of max_steps (steps 1 and 3 of 9);
    # the Trainer counts the tokens.
    grow = GrowthCallback(growth={"axis": "depth", "num_layers": 1}, warmup_steps=3, echo=lambda line: None)
    trainer, seen = train(tmp_path, grow, arguments(tmp_path, max_steps=9, include_num_input_tokens_seen=True,
                                                    **compat.checkpointing_training_argument()))
    assert [e["step"] for e in grow.history] == [1, 3]
    assert all(layer.gradient_checkpointing for layer in trainer.model.model.layers)  # inserted ones too
    assert [e["tokens"] for e in grow.history] == [1 * 4 * SEQ, 3 * 4 * SEQ]
    by_step = {s["step"]: s for s in seen.steps}
    # The new group ramps up to the base lr over 3 steps (the scheduler's lambda carries the ramp).
    ramp = [by_step[k]["lrs"][2] / by_step[k]["lrs"][0] for k in (1, 2, 3, 4)]
    assert ramp == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    warm = unwrap_optimizer(trainer.optimizer).param_groups[2]["arbor_warmup"]
    assert warm["done"] == warm["steps"] == 3


def test_loss_and_token_triggers_see_what_the_trainer_logged(tmp_path):
    # loss-plateau gets the logged losses (epsilon so large that any window is a plateau):
    # losses of steps 1, 2, 3 reach it by step 4, the first step with window + 1 of them.
    grow = GrowthCallback(trigger="loss-plateau", trigger_settings={"window": 2, "epsilon": 10.0, "cooldown": 50},
                          growth={"axis": "ffn", "add": 8}, echo=lambda line: None)
    train(tmp_path, grow, arguments(tmp_path, max_steps=6))
    (event,) = grow.history
    assert event["step"] == 4 and "smoothed loss" in event["reason"]
    # Without the Trainer's count, tokens are estimated: steps x batch x the first example's length.
    grow = GrowthCallback(trigger="compute-optimal", trigger_settings={"tokens_per_parameter": 0.01},
                          growth={"axis": "ffn", "add": 8}, echo=lambda line: None)
    train(tmp_path, grow, arguments(tmp_path, max_steps=4))
    assert [(e["step"], e["tokens"]) for e in grow.history] == [(3, 3 * 4 * SEQ)]  # 0.01 x 18,592 params


def test_grown_checkpoint_resumes_with_trigger_state_and_optimizer_layout(tmp_path):
    def callback():
        return GrowthCallback(trigger_settings={"steps": [3, 8]}, growth={"axis": "depth", "num_layers": 1},
                              freeze_policy="freeze-below", warmup_steps=6, echo=lambda line: None)

    args = arguments(tmp_path, max_steps=10, save_strategy="steps", save_steps=5)
    full, _ = train(tmp_path, callback(), args)  # uninterrupted, saving at steps 5 and 10
    ckpt = tmp_path / "checkpoint-5"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["GrowthCallback"]
    assert saved["attributes"]["_resume_state"]["trigger"] == {"done": 1}

    # The Trainer's model must have the grown architecture; the small one is refused by name.
    small = Trainer(model=tiny_model(), args=args, train_dataset=Blocks(), callbacks=[callback()])
    with pytest.raises(ValueError, match="num_hidden_layers=3 .model: 2.*from_pretrained"):
        prepare_resume(small, ckpt)

    grow = callback()
    resumed = Trainer(model=ArborForCausalLM.from_pretrained(ckpt), args=args, train_dataset=Blocks(),
                      callbacks=[grow])
    prepare_resume(resumed, ckpt)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert [e["step"] for e in grow.history] == [3, 8]  # step 3 restored, not repeated; step 8 taken
    assert resumed.model.config.num_hidden_layers == full.model.config.num_hidden_layers == 4
    frozen = [n for n, p in resumed.model.named_parameters() if not p.requires_grad]
    assert frozen == [n for n, p in full.model.named_parameters() if not p.requires_grad] and frozen
    assert losses(resumed)[-5:] == pytest.approx(losses(full)[-5:], rel=1e-4)


def test_a_checkpoint_mid_ramp_resumes_with_its_masks(tmp_path):
    def callback():
        return GrowthCallback(trigger_settings={"steps": [3]}, echo=lambda line: None,
                              growth={"axis": "ffn", "add": 16, "init": "masked", "init_settings": {"ramp_steps": 6}})

    args = arguments(tmp_path, max_steps=8, save_strategy="steps", save_steps=5)
    full, _ = train(tmp_path, callback(), args)
    ckpt = tmp_path / "checkpoint-5"
    saved = torch.load(ckpt / "arbor_components.pt", weights_only=True)["components"]
    assert saved["arbor_strategies.masked"]["ramps"] == [{"steps": 6, "done": 2}]  # steps 4 and 5 of 6
    resumed = Trainer(model=ArborForCausalLM.from_pretrained(ckpt), args=args, train_dataset=Blocks(),
                      callbacks=[callback()])
    prepare_resume(resumed, ckpt)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-6)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


def test_settings_are_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match="trigger='nope' is not a registered trigger; valid names: .*'schedule'"):
        GrowthCallback(trigger="nope")
    with pytest.raises(ValueError, match="trigger_settings"):
        GrowthCallback(trigger="schedule", trigger_settings={"stepz": [1]})
    with pytest.raises(ValueError, match="new_param_lr_multiplier=0"):
        GrowthCallback(new_param_lr_multiplier=0)
    with pytest.raises(ValueError, match="freeze_policy='thaw'"):
        GrowthCallback(freeze_policy="thaw")
    with pytest.raises(ValueError, match="growth.axis"):
        GrowthCallback(growth={"axis": "sideways"})
