"""The run directory: arbor trains only where it may write, never deletes what it did not write,
lets one process at a time train in it, and resumes only its own checkpoints."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from arbor.cli import main
from arbor.training.rundir import LOCK, RunLock
from arbor.training.trainer import MAX_SKIPPED_IN_A_ROW, TrainConfig, Trainer, TrainingStopped

TINY = ["--no-progress", "--set", "data=builtin", "--set", "seq_len=32", "--set", "vocab_size=300",
        "--set", "sample_tokens=0", "--set", "model.preset=tiny"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "4", "--set", "save_interval=2", *TINY]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK}


def refused(capsys, argv: list[str], code: int = 2) -> str:
    """The one ``arbor: error:`` line of a refused command."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("arbor:")]
    assert len(lines) == 1, err
    return lines[0]


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


# ------------------------------------------------------------------ --check
def test_check_reports_a_typo_in_a_directory_that_holds_a_run(run, capsys):
    line = refused(capsys, ["train", "--check", "--out", str(run), "--set", "model.num_hiden_layers=4"])
    assert "model.num_hiden_layers" in line and "already holds a run" not in line
    capsys.readouterr()
    assert main(["train", "--check", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "ok: the run's settings are valid" in out and "already holds a run" in out  # a note, not a refusal


def test_a_setting_mistake_is_reported_before_the_existing_run(run, capsys):
    line = refused(capsys, ["train", "--out", str(run), "--set", "lr=-1"])
    assert "lr" in line and "already holds a run" not in line


# ------------------------------------------------------- nothing deleted
def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert "--out ''" in refused(capsys, ["train", "--out", "", *TINY])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_metrics_file_arbor_did_not_write_is_never_truncated(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    before = fingerprint(out)
    line = refused(capsys, ["train", "--out", str(out), "--max-steps", "2", *TINY])
    assert "metrics.jsonl" in line and "not an arbor run" in line
    assert fingerprint(out) == before


def test_a_directory_holding_other_files_is_refused(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    line = refused(capsys, ["train", "--out", str(out), "--max-steps", "2", *TINY])
    assert "thesis.tex" in line and "did not write" in line
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_a_checkpoints_file_is_refused_and_the_metrics_kept(run, capsys):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    before = fingerprint(run)
    line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"])
    assert "checkpoints is a file" in line
    assert fingerprint(run) == before


def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    line = refused(capsys, ["train", "--out", str(tmp_path / "notes.txt" / "run"), *TINY])
    assert "is a file" in line and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    refused(capsys, ["train", "--out", str(out), "--set", "device=cuda:7", *TINY])
    refused(capsys, ["train", "--out", str(out), "--data", str(tmp_path / "none.txt"), *TINY])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- lock
def test_a_second_process_in_a_run_directory_is_refused_and_changes_nothing(run, capsys):
    with RunLock(run):  # as a run training there holds it
        before = fingerprint(run)
        line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"])
        assert f"is in use by process {os.getpid()}" in line
        assert fingerprint(run) == before
    # The lock goes with its holder; a lock file left by a killed process is no obstacle.
    (run / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "elsewhere"}))
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    assert ckpt(run, 5).is_dir()


def test_the_lock_is_released_when_the_run_ends_or_fails(run, monkeypatch, capsys):
    import arbor.training.trainer as trainer

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints"))

    monkeypatch.setattr(trainer, "save_checkpoint", full_disk)
    line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"], code=1)
    assert "No space left on device" in line
    assert ckpt(run, 4).is_dir() and not ckpt(run, 6).exists()
    with RunLock(run):  # free again
        pass


# ----------------------------------------------------------------- resume
def test_a_checkpoint_copied_from_another_run_is_refused(run, tmp_path, capsys):
    ckpt(run, 4).rename(ckpt(run, 16))  # a checkpoint of step 4 under the name of step 16
    before = fingerprint(run)
    line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "20", "--no-progress"])
    assert "records step 4" in line and "step-00000016" in line
    assert fingerprint(run) == before


def test_a_checkpoint_of_other_settings_is_refused(run, capsys):
    state_file = ckpt(run, 4) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["preset"] = "small"
    state_file.write_text(json.dumps(state))
    (ckpt(run, 4) / "checksums.json").unlink()  # as if written so by another run
    line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"])
    assert "belongs to another run" in line and "model=" in line


def test_resume_below_the_checkpoint_step_is_refused(run, capsys):
    before = fingerprint(run)
    line = refused(capsys, ["train", "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"])
    assert "--max-steps 3" in line and "step 4" in line
    assert fingerprint(run) == before


def test_resume_takes_the_runs_own_config_file(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('data = "builtin"\nseq_len = 32\nvocab_size = 300\nsample_tokens = 0\nmax_steps = 2\n'
                      '[model]\npreset = "tiny"\n')
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    # The same command plus --resume, with a longer budget: accepted.
    assert main(["train", str(config), "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert ckpt(out, 3).is_dir()
    # A setting the run cannot change is refused, by name.
    config.write_text(config.read_text().replace("seq_len = 32", "seq_len = 16"))
    line = refused(capsys, ["train", str(config), "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"])
    assert "seq_len=16" in line and "seq_len=32" in line


def test_a_run_killed_before_writing_its_settings_starts_again_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "elsewhere"}))  # all a killed start left
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2", *TINY]) == 0
    assert "starting the run from step 0" in capsys.readouterr().err
    assert ckpt(out, 2).is_dir() and (out / "train_config.json").is_file()


def test_settings_are_written_before_the_data_is_read(tmp_path, monkeypatch):
    import arbor.cli.train as train

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while reading the corpus

    monkeypatch.setattr(train, "prepare", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out", str(out), "--max-steps", "2", *TINY])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["data"] == "builtin"


# ------------------------------------------------------------- processes
def test_nproc_that_does_not_divide_the_batch_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    import arbor.cli.train as train

    monkeypatch.setattr(train, "torchrun", lambda argv: pytest.fail("no process may start"))
    line = refused(capsys, ["train", "--out", str(tmp_path / "run"), "--nproc", "3", "--set", "batch_size=4", *TINY])
    assert "batch_size=4" in line and "3 processes" in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------- skipping
def test_skipping_non_finite_steps_is_bounded(tmp_path):
    from arbor import ArborConfig, ArborForCausalLM

    data = torch.randint(0, 48, (40, 16), generator=torch.Generator().manual_seed(0))
    config = TrainConfig.model_validate(dict(max_steps=30, batch_size=4, seq_len=16, on_nonfinite="skip",
                                             save_interval=100, eval_interval=100, model={"preset": "tiny"}))
    model = ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, hidden_size=32, intermediate_size=64))
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan  # every step from the first is non-finite
    trainer = Trainer(model, config, data[:32], data[32:], tmp_path, progress=False, echo=lambda s: None)
    with pytest.raises(TrainingStopped, match=f"{MAX_SKIPPED_IN_A_ROW + 1} steps in a row"):
        trainer.fit()
    assert trainer.step == MAX_SKIPPED_IN_A_ROW


def test_a_recipe_is_a_name_never_a_path(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("max_steps = 1\n")
    relative = os.path.relpath(elsewhere.with_suffix(""), Path(__file__).resolve().parents[1] / "core" / "cli" / "recipes")
    line = refused(capsys, ["train", "--check", "--recipe", relative, "--out", str(tmp_path / "run")])
    assert "is unknown" in line and "as CONFIG" in line


def test_an_out_arbor_may_not_write_is_one_line(tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom chmod does not forbid: the refusal the kernel would give, given directly.
    def forbidden(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", forbidden)
    line = refused(capsys, ["train", "--out", str(tmp_path / "locked" / "run"), *TINY])
    assert "cannot write there (permission denied)" in line
