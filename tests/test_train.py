"""The trainer: growth during training, metrics, checkpoints that survive kills, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.training.checkpointing import latest_checkpoint, list_checkpoints, save_checkpoint
from arbor.training.trainer import TrainConfig, Trainer, batch_at, lr_factor


def blocks(n=72, seq=24, vocab=48):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n, seq), generator=g)
    data[:, 1::2] = (data[:, ::2] * 3 + 1) % vocab  # every second token follows from the one before
    return data[: n - 8], data[n - 8:]


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=24, batch_size=4, seq_len=24, warmup_steps=4, lr=1e-2, eval_interval=8, save_interval=8,
                log_interval=4, keep_checkpoints=2,
                growth={"trigger": "schedule", "trigger_settings": {"steps": [8, 16]},
                        "step": {"axis": "depth", "num_layers": 1}})
    base.update(overrides)
    return TrainConfig.model_validate(base)


def model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, num_key_value_heads=2))


def records(run, key):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_training_grows_exactly_and_the_loss_goes_down(tmp_path):
    train, val = blocks()
    trainer = Trainer(model(), config(), train, val, tmp_path, progress=False, echo=lambda s: None)
    summary = trainer.fit()
    events = records(tmp_path, "event")
    assert [e["step"] for e in events] == [8, 16] and summary["layers"] == 4
    for e in events:
        assert e["exact"] and abs(e["loss_after"] - e["loss_before"]) < 1e-5 and e["params"] > e["params_before"]
        assert "scheduled growth" in e["reason"]
    losses = [r["loss"] for r in records(tmp_path, "loss")]
    assert losses[-1] < losses[0] - 0.3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000016", "step-00000024"]  # keep 2
    reloaded = ArborForCausalLM.from_pretrained(latest_checkpoint(tmp_path))
    assert reloaded.config.num_hidden_layers == 4


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    train, val = blocks()
    cfg = config(growth={"trigger": "schedule", "trigger_settings": {"steps": [6, 14]},
                         "step": {"axis": "ffn", "factor": 1.5}, "new_param_lr_multiplier": 2.0,
                         "warmup_steps": 3})
    Trainer(model(), cfg, train, val, tmp_path / "a", progress=False, echo=lambda s: None).fit()
    first = Trainer(model(), cfg, train, val, tmp_path / "b", progress=False, echo=lambda s: None)
    first.fit(until=12)  # "crashes" after step 12; the last checkpoint is step 8
    del first
    resumed = Trainer.resume(latest_checkpoint(tmp_path / "b"), train, val, tmp_path / "b", progress=False,
                             echo=lambda s: None)
    assert resumed.step == 8
    resumed.fit()
    a = {r["step"]: r["loss"] for r in records(tmp_path / "a", "loss")}
    b = {r["step"]: r["loss"] for r in records(tmp_path / "b", "loss")}  # later lines of a step win
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    save_checkpoint(tmp_path, 5, m, opt, {"tokens": 0})
    script = textwrap.dedent(f"""
        import time, torch
        from arbor import ArborConfig, ArborForCausalLM
        from arbor.training.checkpointing import save_checkpoint
        m = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48))
        class SlowTokenizer:
            model_max_length = 512

            def save_pretrained(self, path):
                print("writing", flush=True)
                time.sleep(60)
        save_checkpoint({str(tmp_path)!r}, 10, m, torch.optim.AdamW(m.parameters()), {{}}, tokenizer=SlowTokenizer())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the model is written, the save is half done
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    ArborForCausalLM.from_pretrained(latest_checkpoint(tmp_path))
    save_checkpoint(tmp_path, 6, m, opt, {"tokens": 0})  # the next save clears the debris
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_schedule_and_batches_are_pure_functions():
    cfg = config(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    data = torch.arange(50).view(10, 5)
    first = [batch_at(data, i, 3, seed=1) for i in range(8)]
    assert all(torch.equal(a, batch_at(data, i, 3, seed=1)) for i, a in enumerate(first))
    seen = torch.cat(first[:4])[:10, 0].tolist()  # the first 10 rows drawn are one epoch: each block once
    assert sorted(seen) == list(range(0, 50, 5))


def test_rewarm_ramps_every_groups_rate_back_up_after_each_growth_step(tmp_path):
    growth = {"trigger": "schedule", "trigger_settings": {"steps": [8, 16]}, "step": {"axis": "depth", "num_layers": 1},
              "rewarm_steps": 4, "new_param_lr_multiplier": 2.0}
    cfg = config(growth=growth)
    trainer = Trainer(model(), cfg, *blocks(), tmp_path, progress=False, echo=lambda s: None)
    seen, set_lr = {}, trainer._set_lr

    def spy():
        set_lr()
        seen[trainer.step] = [(g["lr"], g.get("arbor_lr_multiplier", 1.0)) for g in trainer.optimizer.param_groups]

    trainer._set_lr = spy
    trainer.fit()
    assert len(seen) == 24 and [len(seen[s]) for s in (7, 8, 16)] == [2, 3, 4]  # decay, no decay; one per growth
    for step, groups in seen.items():
        last = max((g for g in (8, 16) if g <= step), default=None)
        ramp = 1.0 if last is None else min(1.0, (step - last + 1) / 4)
        assert lr_factor(step, cfg, last) == pytest.approx(ramp * lr_factor(step, cfg))
        for lr, multiplier in groups:  # the old parameters' group ramps as the new ones' do
            assert lr == pytest.approx(cfg.lr * multiplier * lr_factor(step, cfg) * ramp), step
    assert seen[8][0][0] == pytest.approx(cfg.lr * lr_factor(8, cfg) / 4)
    assert seen[11][0][0] == pytest.approx(cfg.lr * lr_factor(11, cfg))


def test_each_stage_trains_at_its_lr_scale(tmp_path):
    growth = {"trigger": "schedule", "trigger_settings": {"steps": [8, 16]}, "step": {"axis": "depth", "num_layers": 1},
              "stages": [{"lr_scale": 0.5}, {}, {"lr_scale": 2.0}]}
    cfg = config(growth=growth)
    lines = []
    trainer = Trainer(model(), cfg, *blocks(), tmp_path, progress=False, echo=lines.append)
    seen, set_lr = {}, trainer._set_lr

    def spy():
        set_lr()
        schedule = cfg.lr * lr_factor(trainer.step, cfg)
        seen[trainer.step] = {round(g["lr"] / schedule, 9) for g in trainer.optimizer.param_groups}

    trainer._set_lr = spy
    trainer.fit()
    scales = {step: pytest.approx(0.5 if step < 8 else 1.0 if step < 16 else 2.0) for step in range(24)}
    assert {step: next(iter(v)) for step, v in seen.items()} == scales
    assert all(len(v) == 1 for v in seen.values())  # every group, new layers' too
    assert [r.get("lr_scale") for r in records(tmp_path, "event") if r["event"] == "stage"] == [0.5, 1.0, 2.0]
    assert any(line.endswith("learning rate x2") for line in lines)


def test_bf16_autocast_and_gradient_checkpointing_train_and_grow(tmp_path):
    train, val = blocks()
    cfg = config(max_steps=6, bf16=True, gradient_checkpointing=True, save_interval=6, eval_interval=6,
                 growth={"trigger": "schedule", "trigger_settings": {"steps": [3]},
                         "step": {"axis": "depth", "num_layers": 1}})
    trainer = Trainer(model(), cfg, train, val, tmp_path, progress=False, echo=lambda s: None)
    summary = trainer.fit()
    assert summary["growth_events"] == 1 and summary["layers"] == 3
    assert all(layer.gradient_checkpointing for layer in trainer.model.model.layers)
    assert torch.isfinite(torch.tensor(summary["loss"]))


def test_batch_at_draws_each_row_from_its_epochs_seeded_permutation():
    blocks = torch.arange(50).view(-1, 1)
    for index in (0, 3, 6, 12):  # 8 rows per batch over 50 blocks: batch 6 straddles epochs 0 and 1
        rows = []
        for k in range(index * 8, (index + 1) * 8):
            epoch, pos = divmod(k, 50)
            rows.append(int(torch.randperm(50, generator=torch.Generator().manual_seed(7 * 100_003 + epoch))[pos]))
        assert batch_at(blocks, index, 8, seed=7).view(-1).tolist() == rows
