"""The Arbor card's config format: its keys read as arbor's settings, the notice that says how,
the growth-off switch, and one-line errors naming the nearest key for everything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from arbor.cli import main
from arbor.cli.main import build_parser
from arbor.cli.train import build_config
from arbor.training.card_config import (
    CARD_GROWTH_KEYS,
    CARD_MODEL_KEYS,
    CARD_TRAINING_KEYS,
    REFUSED_TRAINING_KEYS,
    translate_card_keys,
)
from arbor.training.trainer import GrowthOff

ROOT = Path(__file__).resolve().parents[1]

#: The card's published config, keys and values as the card writes them.
CARD = """\
model:
  vocab_size: 128000
  hidden_size: 1024
  num_layers: 24           # starting transformer layers
  growth:
    enabled: true          # the card's parameter (FFN) growth
    factor: 2.0            # its FFN growth multiplier
    layer_growth_enabled: true
    min_layers: 24         # start with 24 layers
    max_layers: 64         # grow up to 64 layers
    layer_growth_threshold: 0.92  # 92% utilization trigger (80% of layers must exceed it)
    layer_growth_factor: 4        # add 4 layers at a time
    layer_growth_cooldown: 5000   # wait 5000 steps between growth
training:
  learning_rate: 2e-5
  per_device_train_batch_size: 4
"""

#: Another version of the card: the layer-growth keys in a top-level growth table.
CARD_TOP_LEVEL = """\
model:
  hidden_size: 1024
  num_layers: 24
growth:
  layer_growth_enabled: true
  min_layers: 24
  max_layers: 64
  layer_growth_threshold: 0.92
  layer_growth_factor: 4
  layer_growth_cooldown: 5000
"""

FAST = ["--no-progress", "--set", "data=builtin", "--set", "seq_len=32", "--set", "vocab_size=300",
        "--set", "sample_tokens=0", "--set", "eval_batches=1"]


def config_from(tmp_path, text: str, *extra: str, name: str = "card.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return build_config(build_parser().parse_args(["train", str(path), *extra]))


def usage_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a command the user must fix (exit code 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("arbor: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ mapping
def test_every_card_key_becomes_its_arbor_setting(tmp_path):
    config = config_from(tmp_path, CARD)
    assert config.model == {"hidden_size": 1024, "num_hidden_layers": 24, "min_layers": 24, "max_layers": 64}
    assert config.vocab_size == 128_000
    g = config.growth
    assert g.enabled is True
    assert (g.trigger, g.insertion_policy) == ("utilization", "middle")  # the card's rule, as --recipe arbor
    assert g.trigger_settings == {"threshold": 0.92, "cooldown": 5000, "num_layers": 4}
    assert g.step == {"axis": "depth", "num_layers": 4}
    assert config.lr == 2e-5 and isinstance(config.lr, float)  # YAML reads 2e-5 as a string
    assert config.batch_size == 4


def test_the_top_level_growth_table_reads_the_same(tmp_path):
    top = config_from(tmp_path, CARD_TOP_LEVEL)
    nested = config_from(tmp_path, CARD, name="nested.yaml")
    assert top.growth == nested.growth
    assert {k: top.model[k] for k in ("num_hidden_layers", "min_layers", "max_layers")} == \
        {"num_hidden_layers": 24, "min_layers": 24, "max_layers": 64}


def test_the_notice_names_every_card_key_and_what_it_became(tmp_path, capsys):
    config_from(tmp_path, CARD)
    err = capsys.readouterr().err
    for line in ("model.num_layers = 24 -> model.num_hidden_layers = 24",
                 "model.vocab_size = 128000 -> vocab_size = 128000",
                 "model.growth.layer_growth_enabled = true -> growth.enabled = true, growth.trigger = \"utilization\", "
                 "growth.insertion_policy = \"middle\"",
                 "model.growth.layer_growth_threshold = 0.92 -> growth.trigger_settings.threshold = 0.92",
                 "model.growth.layer_growth_cooldown = 5000 -> growth.trigger_settings.cooldown = 5000",
                 "model.growth.layer_growth_factor = 4 -> growth.trigger_settings.num_layers = 4, growth.step = ",
                 "model.growth.min_layers = 24 -> model.min_layers = 24",
                 "model.growth.max_layers = 64 -> model.max_layers = 64",
                 "training.learning_rate = 2e-05 -> lr = 2e-05",
                 "training.per_device_train_batch_size = 4 -> batch_size = 4"):
        assert line in err, line
    assert "docs/card-config.md" in err.splitlines()[0]
    # The card's FFN growth is not run, and the run says so.
    assert "warning: model.growth.enabled = true, model.growth.factor = 2.0: the card's FFN growth is not run" in err


def test_a_file_in_arbor_keys_prints_no_notice(tmp_path, capsys):
    config_from(tmp_path, "model:\n  num_hidden_layers: 3\ngrowth:\n  enabled: false\n")
    assert capsys.readouterr().err == ""


def test_the_training_table_maps_hugging_face_names_with_an_arbor_meaning():
    table = {"max_grad_norm": 0.5, "gradient_accumulation_steps": 2, "warmup_steps": 7}
    out = translate_card_keys({"training": table}).settings
    assert out == {"grad_clip": 0.5, "grad_accum": 2, "warmup_steps": 7}


def test_layer_growth_enabled_false_switches_growth_off(tmp_path, capsys):
    config = config_from(tmp_path, CARD.replace("layer_growth_enabled: true", "layer_growth_enabled: false"))
    assert config.growth.enabled is False
    assert "model.growth.layer_growth_enabled = false -> growth.enabled = false" in capsys.readouterr().err


def test_min_layers_is_the_starting_depth_when_none_is_given(tmp_path):
    config = config_from(tmp_path, CARD.replace("  num_layers: 24           # starting transformer layers\n", ""))
    assert config.model["num_hidden_layers"] == 24
    # arbor's own model.min_layers means the same
    assert config_from(tmp_path, "model: {min_layers: 3}\n", name="own.yaml").model["num_hidden_layers"] == 3


def test_min_layers_above_the_starting_depth_is_refused(tmp_path, capsys):
    path = tmp_path / "card.yaml"
    path.write_text(CARD.replace("num_layers: 24", "num_layers: 8"))
    line = usage_error(capsys, ["train", str(path), "--check", "--out", str(tmp_path / "run")])
    assert "model.min_layers=24 is invalid: must be <= the starting depth, model.num_hidden_layers=8" in line


def test_a_card_key_and_an_arbor_setting_that_disagree_are_refused(tmp_path, capsys):
    path = tmp_path / "card.yaml"
    path.write_text(CARD.replace("  num_layers: 24", "  num_hidden_layers: 12\n  num_layers: 24"))
    line = usage_error(capsys, ["train", str(path), "--check", "--out", str(tmp_path / "run")])
    assert "model.num_layers = 24 sets model.num_hidden_layers, but model.num_hidden_layers sets it to 12" in line
    path.write_text(CARD_TOP_LEVEL + "  enabled: false\n")  # arbor's switch off, the card's layer growth on
    line = usage_error(capsys, ["train", str(path), "--check", "--out", str(tmp_path / "run")])
    assert "growth.layer_growth_enabled = true sets growth.enabled, but growth.enabled sets it to false" in line


# ------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("text, expected", [
    (CARD_TOP_LEVEL.replace("layer_growth_threshold", "layer_growth_treshold"),
     "growth.layer_growth_treshold: unknown setting; did you mean growth.layer_growth_threshold?"),
    (CARD.replace("layer_growth_cooldown", "layer_growth_cooldwn"),
     "model.growth.layer_growth_cooldwn: unknown setting in the card's growth table; "
     "did you mean model.growth.layer_growth_cooldown?"),
    (CARD.replace("learning_rate", "learning_rat"), "training.learning_rat: unknown setting; "
                                                    "did you mean training.learning_rate?"),
    (CARD.replace("training:", "trainig:"), "trainig: unknown setting; did you mean training?"),
    (CARD_TOP_LEVEL + "  trigger_setings: {}\n", "growth.trigger_setings: unknown setting; "
                                                 "did you mean growth.trigger_settings?"),
    (CARD.replace("  learning_rate: 2e-5", "  num_train_epochs: 3"),
     "training.num_train_epochs: the card's setting has no arbor equivalent: arbor trains for a number of "
     "optimizer steps; set max_steps"),
    (CARD.replace("  learning_rate: 2e-5", "  lr: 0.001"), "training.lr: unknown setting; did you mean lr (at the "
                                                          "top level)?"),
    (CARD.replace("  num_layers: 24", "  num_layer: 24"),
     "model.num_layer=24 is invalid: not a model setting; did you mean model.num_hidden_layers?"),
])
def test_an_unknown_key_is_one_line_naming_the_nearest_allowed_key(tmp_path, capsys, text, expected):
    path = tmp_path / "card.yaml"
    path.write_text(text)
    assert expected in usage_error(capsys, ["train", str(path), "--check", "--out", str(tmp_path / "run")])


def test_the_docs_table_lists_every_card_key():
    doc = (ROOT / "docs" / "card-config.md").read_text(encoding="utf-8")
    keys = [*(f"model.{k}" for k in CARD_MODEL_KEYS), *CARD_GROWTH_KEYS,
            *(f"training.{k}" for k in [*CARD_TRAINING_KEYS, *REFUSED_TRAINING_KEYS])]
    for key in keys:
        assert f"`{key}`" in doc, key
    assert "card-config.md" in (ROOT / "docs" / "training.md").read_text(encoding="utf-8")


# ------------------------------------------------------------ growth off
def test_check_shows_the_growth_off_switch(tmp_path, capsys):
    assert main(["train", "--check", "--out", str(tmp_path / "run"), "--set", "growth.enabled=false"]) == 0
    shown = json.loads(capsys.readouterr().out.rsplit("\nok:", 1)[0])
    assert shown["settings"]["growth"]["enabled"] is False
    assert shown["resolved"]["trigger"].startswith("none: growth.enabled = false")


def growth_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "growth"]


def test_growth_off_never_grows_where_the_same_run_grows(tmp_path, monkeypatch):
    # The default schedule grows at 10 % and 30 % of max_steps: steps 1 and 2 of 4.
    assert main(["train", "--out", str(tmp_path / "on"), "--max-steps", "4", *FAST]) == 0
    assert len(growth_records(tmp_path / "on")) == 2
    # With growth off the trigger is never started, so it can never be asked.
    from arbor_strategies.triggers import ScheduleTrigger

    def refuse(*args, **kwargs):
        raise AssertionError("a run with growth.enabled = false started its trigger")

    monkeypatch.setattr(ScheduleTrigger, "start", refuse)
    assert main(["train", "--out", str(tmp_path / "off"), "--max-steps", "4", "--set", "growth.enabled=false",
                 *FAST]) == 0
    assert growth_records(tmp_path / "off") == []
    saved = json.loads((tmp_path / "off" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert saved["trigger_name"] is None and saved["growth_history"] == []


def test_growth_off_stands_in_for_the_trigger():
    decision = GrowthOff().decide(10, 1000, None)
    assert decision.grow is False and decision.reason == "growth.enabled = false"


# ------------------------------------------------------------ shipped files
def test_the_shipped_card_configs_read_as_the_card(capsys):
    card = yaml.safe_load((ROOT / "configs" / "arbor-card.yaml").read_text())
    baseline = yaml.safe_load((ROOT / "configs" / "arbor-card-baseline.yaml").read_text())
    assert card["model"]["growth"]["layer_growth_enabled"] is True
    assert baseline["model"]["growth"]["layer_growth_enabled"] is False
    assert set(card["model"]["growth"]) == set(CARD_GROWTH_KEYS)  # every key the card's table has
    assert translate_card_keys(baseline).settings["growth"]["enabled"] is False


def test_the_shipped_card_config_trains(tmp_path, capsys):
    run = tmp_path / "card"
    code = main(["train", str(ROOT / "configs" / "arbor-card.yaml"), "--out", str(run), "--max-steps", "5",
                 "--no-progress", "--set", "sample_tokens=0", "--set", "eval_batches=1"])
    assert code == 0
    err = capsys.readouterr().err
    assert "model.num_layers = 2 -> model.num_hidden_layers = 2" in err
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["growth"]["trigger"] == "utilization" and saved["model"]["max_layers"] == 6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 5
    assert all(2 <= r["layers"] <= 6 for r in records if "layers" in r)
