"""Training state that survives save and resume: a resumed run equals the uninterrupted one, bit for bit.

Every built-in init scheme and freeze policy is resumed from a checkpoint written
after a growth step (masks mid-ramp, LoRA adapters mid-stage), and must end with
the parameters and losses of the run that never stopped.
"""

from __future__ import annotations

import json

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.training.checkpointing import latest_checkpoint, load_trainer_state
from arbor.cli import main
from arbor.plugins.selection import Selection
from arbor.training.trainer import TrainConfig, Trainer

pytest.importorskip("peft")


def blocks(n=48, seq=16, vocab=48):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n, seq), generator=g)
    return data[: n - 8], data[n - 8:]


def model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, num_key_value_heads=2))


def config(step: dict, freeze: str | None) -> TrainConfig:
    growth = {"trigger": "schedule", "trigger_settings": {"steps": [3]}, "step": step}
    if freeze is not None:
        growth["freeze_policy"] = freeze
    return TrainConfig.model_validate({"max_steps": 10, "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "lr": 1e-2,
                                       "eval_interval": 5, "save_interval": 5, "log_interval": 1,
                                       "sample_tokens": 0, "growth": growth})


def run(cfg, out, until=None):
    train, val = blocks()
    trainer = Trainer(model(), cfg, train, val, out, plugins=Selection(), progress=False, echo=lambda s: None)
    trainer.fit(until=until)
    return trainer


def losses(out) -> dict[int, float]:
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


CASES = [
    ({"axis": "depth", "num_layers": 1}, None),  # zero init
    ({"axis": "depth", "num_layers": 1, "init": "stack"}, None),
    ({"axis": "depth", "num_layers": 1, "init": "copy-neighbor"}, None),
    ({"axis": "ffn", "add": 16, "init": "split"}, None),
    ({"axis": "depth", "num_layers": 1, "init": "masked", "init_settings": {"ramp_steps": 6}}, None),
    ({"axis": "ffn", "add": 16, "init": "masked", "init_settings": {"ramp_steps": 6}}, None),
    ({"axis": "heads", "add": 4, "add_kv": 2, "init": "masked", "init_settings": {"ramp_steps": 6}}, None),
    ({"axis": "depth", "num_layers": 1}, "none"),
    ({"axis": "depth", "num_layers": 1}, "freeze-below"),
    ({"axis": "depth", "num_layers": 1}, "lora-below"),
    ({"axis": "depth", "num_layers": 1, "init": "masked", "init_settings": {"ramp_steps": 6}}, "lora-below"),
]


@pytest.mark.parametrize("step,freeze", CASES, ids=[f"{s.get('init', 'zero')}-{s['axis']}-{f}" for s, f in CASES])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, step, freeze):
    cfg = config(step, freeze)
    whole = run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b", until=7)  # "crashes" after step 7; the last checkpoint is step 5, after the growth
    train, val = blocks()
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint.name.endswith("05")
    resumed = Trainer.resume(checkpoint, train, val, tmp_path / "b", plugins=Selection(), progress=False,
                             echo=lambda s: None)
    resumed.fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # exactly, every step
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert a[name].requires_grad == b[name].requires_grad, name


def test_a_utilization_run_resumes_with_its_statistics_window(tmp_path):
    # The window (3 measurements, one every 2nd forward) is full at step 5 and decides the growth
    # steps after it; restarting it on resume would move them.
    cfg = TrainConfig.model_validate({
        "max_steps": 12, "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "lr": 1e-2, "eval_interval": 5,
        "save_interval": 5, "log_interval": 1, "sample_tokens": 0,
        "growth": {"trigger": "utilization", "step": {"axis": "depth", "num_layers": 1},
                   "trigger_settings": {"threshold": 0.01, "fraction": 0.5, "cooldown": 3, "stats_interval": 2,
                                        "history": 3, "max_layers": 5, "num_layers": 1}}})
    whole = run(cfg, tmp_path / "a")
    assert [e["step"] for e in whole.history] and whole.model.config.num_hidden_layers > 2
    run(cfg, tmp_path / "b", until=7)
    train, val = blocks()
    resumed = Trainer.resume(latest_checkpoint(tmp_path / "b"), train, val, tmp_path / "b", plugins=Selection(),
                             progress=False, echo=lambda s: None)
    resumed.fit()
    assert [e["step"] for e in resumed.history] == [e["step"] for e in whole.history]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = dict(whole.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_masks_and_adapters_are_saved_as_they_are(tmp_path):
    step = {"axis": "depth", "num_layers": 1, "init": "masked", "init_settings": {"ramp_steps": 6}}
    run(config(step, "lora-below"), tmp_path, until=5)
    _, tensors = load_trainer_state(latest_checkpoint(tmp_path))
    masks = tensors["components"]["arbor_strategies.masked"]
    assert masks["ramps"] == [{"steps": 6, "done": 2}]  # grown after step 3: forwards of steps 4 and 5
    assert {m["module"] for m in masks["masks"]} == {"model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    lora = tensors["components"]["arbor_strategies.lora-below"]  # the layers below the new one (0 and 2 of 3)
    assert lora["r"] == 8 and {m.split(".")[2] for m in lora["modules"]} == {"0", "2"}
    assert any(k.endswith("lora_A.arbor.weight") for k in lora["tensors"])
    # The checkpoint's weights are still an ordinary model with the adapters merged in.
    plain = ArborForCausalLM.from_pretrained(latest_checkpoint(tmp_path))
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())


def test_settings_that_may_change_apply_on_resume_and_others_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", "builtin", "--out", str(out), "--no-progress", "--set", "model.preset=tiny",
            "--set", "vocab_size=320", "--set", "seq_len=32", "--set", "batch_size=4", "--set", "max_steps=4",
            "--set", "save_interval=2", "--set", "sample_tokens=0"]
    assert main(base) == 0
    assert main(["train", "--out", str(out), "--resume", "--no-progress", "--set", "max_steps=6",
                 "--set", "lr=1e-3"]) == 0
    state, _ = load_trainer_state(latest_checkpoint(out))
    assert state["step"] == 6 and state["config"]["lr"] == 1e-3
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--set", "seq_len=64"]) == 2
    err = capsys.readouterr().err
    assert "seq_len" in err and "--resume" in err and "max_steps" in err  # names it, and what may change
    assert main(["train", "--out", str(out), "--resume", "--data", "stdlib"]) == 2
    assert "--data" in capsys.readouterr().err
