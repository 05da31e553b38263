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
    (["grow", "{ckpt}", "--depth", "1", "--out", "{ckpt}"], "is the checkpoint"),
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


# --------------------------------------------------------------------- train
def test_train_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--max-steps", "12", "--no-progress", "--data", "builtin",
            "--set", "seq_len=32", "--set", "vocab_size=300", "--set", "eval_interval=6", "--set", "save_interval=6",
            "--set", "log_interval=3", "--set", "sample_tokens=5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("grew ") == 2 and "(zero, exact)" in text and "sample:" in text
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    assert [(e["axis"], e["step"], e["layers"]) for e in events] == [("depth", 1, 4), ("depth", 4, 6)]  # 10 %, 30 %
    assert all(abs(e["loss_after"] - e["loss_before"]) < 1e-5 for e in events)
    assert (out / "training.png").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import arbor  # noqa: F401 - registers the model type

    checkpoint = out / "checkpoints" / "step-00000012"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 6 and AutoTokenizer.from_pretrained(checkpoint)("hi").input_ids
    # Resume to a longer budget continues the same run.
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "15", "--no-progress"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-00000015").is_dir()
    assert main(["generate", str(out / "checkpoints" / "step-00000015"), "The", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--recipe", "nope"], "--recipe"),
    (["train", "--set", "lr"], "key=value"),
    (["train", "--set", "lr=-1"], "lr"),
    (["train", "--set", "lr=Infinity"], "lr"),
    (["train", "--set", "colour=red"], "colour"),
    (["train", "--set", "model.preset=nope"], "preset"),
    (["train", "--set", "model.hidden_size=-4"], "hidden_size"),
    (["train", "--data", "no/such/*.txt"], "no/such"),
    (["train", "missing.toml"], "missing.toml"),
    (["train", "--resume"], "no checkpoint"),
])
def test_train_bad_input(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_auto_tokenizer_follows_the_substrate():
    from arbor.cli.train import _substrate_tokenizer
    from arbor.training.trainer import TrainConfig

    glyphs = _substrate_tokenizer(TrainConfig(model={"preset": "tiny", "substrate": "unicode-glyphs"}))
    assert len(glyphs) == 65_536 and glyphs("Aé").input_ids == [ord("A"), ord("é")]
    assert _substrate_tokenizer(TrainConfig(model={"preset": "tiny", "substrate": "binary"})) is None
    assert _substrate_tokenizer(TrainConfig()) is None
