"""Bad input and faults, as a user meets them on the command line: one case per probe.

Every case asserts the exit code (2: the input is wrong; 1: the run could not go on), that the
one line on stderr names the setting, file or plugin at fault, that no traceback is printed, and
that no checkpoint or metrics file was damaged by the failed command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from arbor.cli import main

TINY = ["--no-progress", "--set", "data=builtin", "--set", "seq_len=32", "--set", "vocab_size=300",
        "--set", "sample_tokens=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--set", "save_interval=2", *TINY]) == 0
    return run


def fingerprint(run: Path) -> dict[str, str]:
    """Hashes of every file of a run directory, to show a failed command left it as it was."""
    if not run.exists():
        return {}
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != "training.png"}


def flip(path: Path, offset: int = -64, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def ckpt(run: Path, step: int = 4) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


# Each case: (id, how to damage a copy of the trained run or None, argv, exit code, fragment of the message).
# "{run}" is the run directory (a fresh copy of `trained`, or a new path), "{tmp}" the test's tmp_path.
CASES = [
    # accepted silently before: now refused up front
    ("typo-model-key", None, ["train", "--set", "model.num_hiden_layers=4"], 2, "model.num_hiden_layers"),
    ("alias-model-key", None, ["train", "--set", "model.num_layers=8"], 2, "model.num_hidden_layers"),
    ("toml-model-typo", "toml", ["train", "{tmp}/run.toml"], 2, "model.hiden_size"),
    ("seq-len-past-positions", None, ["train", "--set", "seq_len=1024"], 2, "seq_len=1024"),
    ("infinite-lr", None, ["train", "--set", "lr=Infinity"], 2, "lr"),
    ("negative-rope-theta", None,
     ["train", "--set", 'model.rope_parameters={"rope_type": "default", "rope_theta": -5}'], 2, "rope_theta"),
    ("empty-data", None, ["train", "--set", "data="], 2, "data=''"),
    # refused too late before: now before any data is read
    ("negative-layers", None, ["train", "--set", 'growth.step={"axis": "depth", "num_layers": -1}'], 2,
     "growth.step"),
    ("unknown-axis", None, ["train", "--set", 'growth.step={"axis": "sideways"}'], 2, "growth.step"),
    ("shrinking-factor", None, ["train", "--set", 'growth.step={"axis": "ffn", "factor": 0.5}'], 2,
     "growth.step"),
    ("unknown-step-key", None, ["train", "--set", 'growth.step={"axis": "depth", "colour": 1}'], 2,
     "growth.step"),
    ("position-99", None, ["train", "--set", 'growth.step={"axis": "depth", "num_layers": 1, "positions": [99]}'],
     2, "growth.step.positions"),
    ("unknown-init", None, ["train", "--set", "growth.init=nope"], 2, "growth.init='nope'"),
    ("unknown-policy", None, ["train", "--set", "growth.insertion_policy=nope"], 2, "growth.insertion_policy"),
    ("no-cuda", None, ["train", "--set", "device=cuda:7"], 2, "device='cuda:7'"),
    ("trigger-settings", None, ["train", "--set", "growth.trigger=schedule", "--set",
                                'growth.trigger_settings={"steps": "often"}'], 2, "growth.trigger_settings.steps"),
    ("freeze-settings", None, ["train", "--set", "growth.freeze_policy=freeze-below", "--set",
                               'growth.freeze_settings={"colour": 1}'], 2, "growth.freeze_settings.colour"),
    ("substrate-settings", None, ["train", "--set", "model.substrate=binary", "--set",
                                  'model.substrate_settings={"scale": -1}'], 2, "model.substrate_settings.scale"),
    ("huge-seed", None, ["train", "--set", "seed=99999999999999999999"], 2, "seed="),
    ("rope-parameters-not-a-table", None, ["train", "--set", "model.rope_parameters=foo"], 2, "rope_parameters"),
    ("out-is-a-file", "out-file", ["train", "--out", "{tmp}/a-file"], 2, "is a file"),
    # damaged checkpoints: named, skipped, never trusted
    ("broken-trainer-state", "state", ["train", "--out", "{run}", "--resume"], 2, "trainer_state.json"),
    ("missing-config", "no-config", ["generate", "{ckpt}", "The"], 2, "config.json"),
    ("truncated-safetensors", "truncate-weights", ["generate", "{ckpt}", "The"], 2, "model.safetensors"),
    ("header-damaged-safetensors", "header-weights", ["generate", "{ckpt}", "The"], 2, "model.safetensors"),
    ("truncated-optimizer", "truncate-optimizer-all", ["train", "--out", "{run}", "--resume"], 2, "optimizer.pt"),
    ("pickled-optimizer", "pickle-optimizer-all", ["train", "--out", "{run}", "--resume"], 2, "optimizer.pt"),
    ("flipped-weights-resume", "flip-weights", ["train", "--out", "{run}", "--resume", "--max-steps", "5"], 0,
     "skipping checkpoint step-00000004"),
    # text
    ("empty-prompt", None, ["generate", "{ckpt}", ""], 2, "prompt is empty"),
]


def _damage(how: str | None, run: Path, tmp: Path) -> None:
    import torch

    if how == "toml":
        (tmp / "run.toml").write_text("max_steps = 4\n[model]\npreset = \"tiny\"\nhiden_size = 96\n")
    elif how == "out-file":
        (tmp / "a-file").write_text("precious")
    elif how == "state":
        for checkpoint in (ckpt(run, 2), ckpt(run)):
            (checkpoint / "checksums.json").unlink()  # no checksums: the reader itself must name the file
            (checkpoint / "trainer_state.json").write_text("{\"step\": 4,")
    elif how == "no-config":
        (ckpt(run) / "checksums.json").unlink()
        (ckpt(run) / "config.json").unlink()
    elif how == "truncate-weights":
        (ckpt(run) / "checksums.json").unlink()
        weights = ckpt(run) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "header-weights":
        (ckpt(run) / "checksums.json").unlink()
        flip(ckpt(run) / "model.safetensors", offset=0, count=8)
    elif how in ("truncate-optimizer-all", "pickle-optimizer-all"):
        for checkpoint in (ckpt(run, 2), ckpt(run)):
            (checkpoint / "checksums.json").unlink()
            target = checkpoint / "optimizer.pt"
            if how.startswith("truncate"):
                target.write_bytes(target.read_bytes()[:200])
            else:
                torch.save({"optimizer": {}, "rng": {}, "object": Path("x")}, target)
    elif how == "flip-weights":
        flip(ckpt(run) / "model.safetensors")


@pytest.mark.parametrize(("how", "argv", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(trained, tmp_path, capsys, how, argv, code, fragment):
    run = tmp_path / "run"
    if any("{run}" in a or "{ckpt}" in a for a in argv):
        shutil.copytree(trained, run)
    _damage(how, run, tmp_path)
    argv = [a.replace("{run}", str(run)).replace("{ckpt}", str(ckpt(run))).replace("{tmp}", str(tmp_path))
            for a in argv]
    if argv[0] == "train":  # the case's own settings come last, so they win over the small defaults
        argv = ["train", *TINY, *([] if "--out" in argv else ["--out", str(run)]), *argv[1:]]
    before = fingerprint(run)
    capsys.readouterr()
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 0:
        assert fragment in captured.err
        assert metric_steps(run) == sorted(set(metric_steps(run)))  # no record written twice
        return
    errors = [line for line in captured.err.strip().splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and fragment in errors[0], captured.err
    assert fingerprint(run) == before  # a refused command changes nothing on disk
    if how == "out-file":
        assert (tmp_path / "a-file").read_text() == "precious"


def metric_steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r and "event" not in r]


def test_a_run_whose_loss_becomes_infinite_stops_with_its_checkpoint_intact(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(run), "--max-steps", "8", "--set", "save_interval=2", "--set", "lr=1e30",
            "--set", "warmup_steps=0"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not all finite" in err[0] and "Traceback" not in err[0]
    from arbor.model.checkpoint import verify_checksums
    from arbor.training.checkpointing import list_checkpoints

    for checkpoint in list_checkpoints(run):  # whatever was saved is intact and finite
        assert verify_checksums(checkpoint)


# ------------------------------------------------ plugins failing during training


@pytest.fixture
def faulty_plugin(site):
    from test_plugins import FAULTY_PLUGIN

    site("faultyplug", FAULTY_PLUGIN, version="0.3")


PLUGIN_CASES = [
    ("decide-returns-none", ["--set", "growth.trigger=faulty-none"], "not a Decision"),
    ("decide-returns-dict", ["--set", "growth.trigger=faulty-dict"], "returned a dict, not a Decision"),
    ("state-holds-a-tensor", ["--set", "growth.trigger=faulty-tensor"], "not JSON"),
    ("growth-hook-raises", ["--set", "growth.trigger=faulty-grow", "--set", "model.max_position_embeddings=384"],
     "hook arbor_grow_depth: RuntimeError"),
    ("stats-hook-raises", ["--set", "growth.trigger=utilization", "--set",
                           'growth.trigger_settings={"stats_interval": 1}', "--set",
                           "model.max_position_embeddings=256"], "hook arbor_pre_forward_stats: ValueError"),
    ("init-breaks-its-exactness-claim", ["--set", "growth.trigger=faulty-grow", "--set", "growth.init=liar",
                                         "--set", "growth.exactness=error"], "claims an exact growth step"),
]


@pytest.mark.parametrize(("settings", "fragment"), [c[1:] for c in PLUGIN_CASES], ids=[c[0] for c in PLUGIN_CASES])
def test_a_failing_plugin_stops_the_run_in_one_line(faulty_plugin, tmp_path, capsys, settings, fragment):
    from arbor.model.checkpoint import verify_checksums
    from arbor.training.checkpointing import list_checkpoints

    run = tmp_path / "run"
    argv = ["train", *TINY, "--out", str(run), "--max-steps", "4", "--set", "save_interval=1", *settings]
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in captured.err, captured.err
    if "claims" not in fragment:
        assert "'faultyplug' 0.3" in errors[0]
    for checkpoint in list_checkpoints(run):  # what was saved before the failure is intact
        assert verify_checksums(checkpoint)
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        json.loads(line)


# ------------------------------------------------------------------- odd text
def test_data_with_lone_surrogates_and_special_token_text_trains(tmp_path, capsys):
    from arbor.cli.train import prepare
    from arbor.training.trainer import TrainConfig

    data = tmp_path / "data.jsonl"
    docs = [f"document {i}: text <|eos|> that names <|bos|> special tokens \ud800 and a lone surrogate " * 8
            for i in range(40)]
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    tokenizer, train, val = prepare(TrainConfig.model_validate({"data": str(data), "seq_len": 32,
                                                                "vocab_size": 300}), echo=lambda s: None)
    stream = torch_cat(train, val)
    assert int((stream == tokenizer.eos_token_id).sum()) <= len(docs)  # one per document at most, none forged
    assert int((stream == tokenizer.bos_token_id).sum()) == 0
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--data", str(data), "--max-steps", "2"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def torch_cat(*blocks):
    import torch

    return torch.cat([b.reshape(-1) for b in blocks])


def test_a_prompt_naming_special_tokens_is_text(trained, capsys):
    assert main(["generate", str(ckpt(trained)), "<|eos|><|eos|>", "--max-new-tokens", "3"]) == 0
    assert "Traceback" not in capsys.readouterr().err
