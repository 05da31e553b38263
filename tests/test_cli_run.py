"""``arbor grow``, ``arbor plot`` (and ``generate`` where a tokenizer is at hand)."""

from __future__ import annotations

import json

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize(("flags", "check"), [
    (["--depth", "2"], lambda c: c.num_hidden_layers == 4),
    (["--width", "256", "--init", "split"], lambda c: c.layer_intermediate_sizes == [256, 256]),
    (["--heads", "8", "--kv-heads", "4"], lambda c: c.layer_num_attention_heads == [8, 8]),
    (["--hidden", "96"], lambda c: c.hidden_size == 96),
])
def test_grow_writes_an_exactly_grown_checkpoint(checkpoint, tmp_path, capsys, flags, check):
    out = tmp_path / "grown"
    assert main(["grow", str(checkpoint), *flags, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(exact)" in text and f"wrote {out}" in text
    before = ArborForCausalLM.from_pretrained(checkpoint).eval()
    after = ArborForCausalLM.from_pretrained(out).eval()
    assert check(after.config)
    ids = torch.randint(0, 48, (2, 9))
    with torch.no_grad():
        assert (after(ids).logits - before(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize(("argv", "message"), [
    (["grow", "{ckpt}", "--depth", "1", "--out", "{ckpt}"], "checkpoint itself"),
    (["grow", "{ckpt}", "--width", "8"], "shrink"),
    (["grow", "{ckpt}", "--depth", "1", "--init", "masked"], "masked"),
    (["grow", "{ckpt}", "--width", "256", "--kv-heads", "2"], "--kv-heads"),
    (["grow", "{ckpt}", "--depth", "1", "--init", "nope"], "not a registered init scheme"),
    (["grow", "missing-dir", "--depth", "1"], "does not exist"),
    (["plot", "missing-run"], "metrics.jsonl"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, capsys, argv, message):
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_plot_marks_growth_events(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "tokens": 10, "loss": 3.0, "params": 100, "layers": 2},
             {"event": "growth", "step": 2, "tokens": 20, "axis": "depth", "init": "zero", "params_before": 100,
              "params": 180},
             {"step": 3, "tokens": 30, "loss": 2.5, "params": 180, "layers": 3},
             {"step": 3, "tokens": 30, "val_loss": 2.7}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"step\": 4, \"tok")  # cut short
    assert main(["plot", str(run)]) == 0
    png = (run / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
