"""Utilization: the four measures, Arbor's rule firing on the normalised one in a short run, and its plot."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.training.plot import plot_run
from arbor.training.trainer import TrainConfig, Trainer
from arbor_strategies.stats import MEASURES, LayerStats

GEN = torch.Generator().manual_seed(0)


def measure(x: torch.Tensor, name: str) -> float:
    stats = LayerStats()
    stats.add(0, x)
    return stats.utilization(name)[0]


# ------------------------------------------------------------------ measures
def test_capacity_counts_the_directions_in_use_whatever_their_scale():
    isotropic = torch.randn(1, 4000, 32, generator=GEN)
    assert measure(isotropic, "capacity") > 0.95
    eight = torch.randn(1, 4000, 8, generator=GEN) @ torch.linalg.qr(torch.randn(32, 32, generator=GEN))[0][:8]
    assert abs(measure(eight, "capacity") - 8 / 32) < 0.02  # 8 of 32 directions, rotated off the axes
    assert abs(measure(isotropic * 1e3, "capacity") - measure(isotropic, "capacity")) < 1e-4  # scale-free
    # One direction holding two thirds of the variance (as a trained residual stream's dominant
    # directions do) costs capacity a few per cent; it drives the participation ratio towards 1/d.
    massive = isotropic.clone()
    massive[..., 0] *= 8
    assert measure(massive, "capacity") > 0.94 and measure(massive, "participation") < 0.1


def test_card_is_the_mean_activation_norm_times_the_share_of_non_zero_activations():
    x = torch.zeros(1, 4, 8)
    x[0, 0, :2] = torch.tensor([3.0, 4.0])  # norm 5
    x[0, 1, 0] = -2.0  # norm 2; the other two tokens are all zeros
    # mean norm (5 + 2 + 0 + 0) / 4 = 1.75, non-zero share 3 / 32
    assert measure(x, "card") == pytest.approx(1.75 * 3 / 32)
    wide = torch.randn(1, 1000, 64, generator=GEN)
    assert measure(wide, "card") > 7  # not bounded: about sqrt(64) for unit-RMS activations
    assert measure(10 * wide, "card") == pytest.approx(10 * measure(wide, "card"), rel=1e-5)


def test_every_statistics_call_records_every_measure():
    stats = LayerStats()
    for layer in range(3):
        stats.add(layer, torch.randn(2, 64, 16, generator=GEN))
    every = stats.utilizations()
    assert list(every) == list(MEASURES) and all(len(v) == 3 for v in every.values())
    assert every["capacity"] == stats.utilization("capacity")


# ------------------------------------------- Arbor's rule, scaled to the tiny preset
def tiny_run(tmp_path, vocab: int, steps: int = 24):
    """Arbor-500M-1B's recipe on the tiny preset: start at a quarter of 24 layers (6), +4 at the middle
    when 80 % of the layers are above 0.92, statistics every 5 steps over a window of 3, and the
    5,000-step cooldown scaled to the run (20 steps). The data repeat a pattern over ``vocab`` tokens."""
    data = torch.randint(0, vocab, (120, 32), generator=torch.Generator().manual_seed(0))
    data[:, 1::2] = (data[:, ::2] * 3 + 1) % vocab
    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=256, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=6))
    config = TrainConfig.model_validate({
        "max_steps": steps, "batch_size": 8, "seq_len": 32, "warmup_steps": 4, "lr": 1e-2, "log_interval": 5,
        "eval_interval": 1000, "save_interval": 1000, "sample_tokens": 0,
        "growth": {"trigger": "utilization", "insertion_policy": "middle", "step": {"axis": "depth", "num_layers": 4},
                   "trigger_settings": {"measure": "capacity", "threshold": 0.92, "fraction": 0.8, "cooldown": 20,
                                        "stats_interval": 5, "history": 3}}})
    trainer = Trainer(model, config, data[:-16], data[-16:], tmp_path, progress=False, echo=lambda s: None)
    trainer.fit()
    return trainer, [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_arbors_rule_grows_a_tiny_model_on_capacity_and_says_why(tmp_path):
    trainer, records = tiny_run(tmp_path, vocab=256)
    growth = [r for r in records if r.get("event") == "growth"]
    assert growth and growth[0]["layers"] == 10 and trainer.model.config.num_hidden_layers >= 10
    reason = growth[0]["reason"]
    assert "capacity utilization" in reason and "above 0.92" in reason and ">= 80%" in reason, reason
    # The figures behind it are in the metrics: the last record before the growth step has at least
    # 80 % of its 6 layers above 0.92, measured by capacity...
    before = [r for r in records if "utilization" in r and r["step"] <= growth[0]["step"]][-1]
    assert before["utilization_measure"] == "capacity" and len(before["utilization"]) == 6
    assert sum(u > 0.92 for u in before["utilization"]) >= 0.8 * 6
    # ... while the participation ratio of the same statistics stays far below it: that measure
    # would never have grown this model.
    assert max(before["utilization_measures"]["participation"]) < 0.92
    assert set(before["utilization_measures"]) == set(MEASURES)


def test_arbors_rule_does_not_grow_a_model_whose_inputs_use_few_directions(tmp_path):
    # 8 tokens cannot fill 32 dimensions: the layers' inputs stay in a few directions.
    trainer, records = tiny_run(tmp_path, vocab=8)
    assert trainer.model.config.num_hidden_layers == 6 and not trainer.history
    last = [r for r in records if "utilization" in r][-1]
    assert max(last["utilization"]) < 0.92
    assert "0/6 layers above 0.92 capacity utilization" in trainer.trigger.decide(trainer.step, 0, trainer.model).reason


# ----------------------------------------------------------------------- plot
def png_height(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[20:24])[0]


def test_plot_draws_per_layer_utilization_when_the_metrics_have_it(tmp_path):
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    for run in (plain, measured):
        run.mkdir()
    lines = [{"step": s, "tokens": 100 * s, "loss": 3.0 - s / 10, "params": 100 if s < 3 else 180,
              "layers": 2 if s < 3 else 4} for s in range(1, 6)]
    (plain / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    growth = {"event": "growth", "step": 2, "tokens": 200, "axis": "depth", "init": "zero", "params_before": 100,
              "params": 180, "reason": "2/2 layers above 0.92 capacity utilization"}
    for r in lines:
        r.update(utilization=[0.9, 0.95] if r["step"] < 3 else [0.5, 0.6, 0.7, 0.8], utilization_measure="capacity",
                 utilization_threshold=0.92, utilization_fraction=0.8)
    (measured / "metrics.jsonl").write_text("\n".join(map(json.dumps, [*lines[:2], growth, *lines[2:]])) + "\n")
    assert png_height(plot_run(measured)) > 1.4 * png_height(plot_run(plain))  # two more panels
