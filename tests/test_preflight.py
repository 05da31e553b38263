"""Every setting of a run is checked before any work, all problems at once (`arbor.training.preflight`)."""

from __future__ import annotations

import json

import pytest

from arbor.cli import main
from arbor.training.preflight import RunCheckError, check_run
from arbor.training.trainer import TrainConfig


def problems(**settings) -> list[str]:
    try:
        check_run(TrainConfig.model_validate(settings))
    except RunCheckError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"growth": {"step": {"axis": "depth", "num_layers": -1}}}, "growth.step="),
    ({"growth": {"step": {"axis": "sideways"}}}, "growth.step="),
    ({"growth": {"step": {"axis": "ffn", "factor": 0.5}}}, "growth.step="),
    ({"growth": {"step": {"axis": "depth", "colour": 1}}}, "growth.step="),
    ({"growth": {"init": "nope"}}, "growth.init='nope': not a registered init scheme; valid names:"),
    ({"growth": {"insertion_policy": "sideways"}}, "growth.insertion_policy='sideways'"),
    ({"growth": {"trigger": "nope"}}, "growth.trigger='nope'"),
    ({"growth": {"freeze_policy": "nope"}}, "growth.freeze_policy='nope'"),
    ({"growth": {"trigger": "schedule", "trigger_settings": {"steps": "often"}}}, "growth.trigger_settings.steps"),
    ({"growth": {"freeze_policy": "freeze-below", "freeze_settings": {"colour": 1}}},
     "growth.freeze_settings.colour: unknown setting"),
    ({"data": ""}, "data='': is empty"),
    ({"data": "no/such/file.txt"}, "data='no/such/file.txt': matches no file"),
    ({"tokenizer": "no/such/tokenizer.json"}, "tokenizer='no/such/tokenizer.json'"),
    ({"device": "cuda:7"}, "device='cuda:7'"),
    ({"device": "toaster"}, "device='toaster': not a device"),
    ({"seq_len": 1024}, "seq_len=1024: must be <= the model's max_position_embeddings=512"),
    ({"seed": 2**64}, "seed="),
    ({"model": {"preset": "tiny", "num_layers": 8}}, "model.num_layers=8"),
])
def test_each_problem_names_its_setting(settings, fragment):
    found = problems(**settings)
    assert len(found) == 1 and fragment in found[0], found


def test_a_good_run_resolves_its_components():
    resolved = check_run(TrainConfig.model_validate({"growth": {"init": "split", "trigger": "schedule"}}))
    assert resolved["init_scheme"] == "split" and resolved["trigger"] == "schedule"
    assert resolved["model"]["num_hidden_layers"] == 2


def test_the_cli_reports_every_problem_at_once_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--set", "growth.init=nope", "--set", "data=", "--set", "seq_len=4096"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err
    assert all(part in err[0] for part in ("growth.init='nope'", "data=''", "seq_len=4096", "and 2 more"))
    assert captured.out == "" and not out.exists()  # no data read, nothing written


def test_check_prints_the_resolved_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--check", "--out", str(out), "--set", "growth.init=split"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[: text.rindex("}") + 1])
    assert report["resolved"]["init_scheme"] == "split" and report["settings"]["growth"]["init"] == "split"
    assert text.strip().endswith("ok: the run's settings are valid")
    assert not out.exists()


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"growth": {"step": {"axis": "depth", "num_layers": 1, "positions": [99]}}}, "growth.step.positions=[99]"),
    ({"growth": {"step": {"axis": "ffn", "factor": 2.0, "layers": [5]}}}, "growth.step.layers=[5]"),
    ({"model": {"preset": "tiny", "substrate": "binary", "substrate_settings": {"scale": -1}}},
     "model.substrate_settings.scale"),
    ({"model": {"preset": "tiny", "substrate": "nope"}}, "model.substrate='nope'"),
])
def test_growth_positions_and_substrate_settings_are_checked(settings, fragment):
    found = problems(**settings)
    assert len(found) == 1 and fragment in found[0], found
