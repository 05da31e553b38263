"""Checkpoints you can trust: checksums, damaged checkpoints skipped and kept out of rotation,
unreadable files named in one line, runs that restart cleanly, metrics without replayed records."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from arbor import ArborConfig, ArborForCausalLM
from arbor.model.checkpoint import CHECKSUMS, CheckpointIntegrityError, verify_checksums
from arbor.training.checkpointing import (
    CheckpointError,
    latest_intact_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)
from arbor.cli import main
from arbor.training.trainer import truncate_metrics


def tiny_model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, hidden_size=32, intermediate_size=64))


def save(run, step, model, keep=3):
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"tokens": step * 10, "config": {}}
    return save_checkpoint(run, step, model, optimizer, state, keep=keep)


def flip_bytes(path, offset=-64, count=16):
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_carries_checksums_of_every_file(tmp_path):
    checkpoint = save(tmp_path, 1, tiny_model())
    listed = json.loads((checkpoint / CHECKSUMS).read_text())["files"]
    on_disk = {p.name for p in checkpoint.iterdir() if p.name != CHECKSUMS}
    assert set(listed) == on_disk and {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= on_disk
    assert verify_checksums(checkpoint) is True


def test_flipped_weight_bytes_are_found_on_load_and_resume(tmp_path):
    model = tiny_model()
    good = save(tmp_path, 1, model)
    bad = save(tmp_path, 2, model)
    flip_bytes(bad / "model.safetensors")
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors: damaged"):
        ArborForCausalLM.from_pretrained(bad)
    warnings = []
    assert latest_intact_checkpoint(tmp_path, warn=warnings.append) == good
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "model.safetensors" in warnings[0]
    ArborForCausalLM.from_pretrained(good)  # the intact one still loads


def test_a_missing_listed_file_is_named(tmp_path):
    checkpoint = save(tmp_path, 1, tiny_model())
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(CheckpointIntegrityError, match="optimizer.pt: missing"):
        verify_checksums(checkpoint)


def test_saving_over_a_checkpoint_directory_drops_its_stale_checksums(tmp_path):
    checkpoint = save(tmp_path, 1, tiny_model())
    other = tiny_model()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(checkpoint)  # a user's own save into the directory: new bytes, old checksums gone
    assert not (checkpoint / CHECKSUMS).exists()
    ArborForCausalLM.from_pretrained(checkpoint)


def test_rotation_never_removes_the_only_intact_checkpoints(tmp_path):
    model = tiny_model()
    save(tmp_path, 10, model, keep=2)
    damaged = save(tmp_path, 20, model, keep=2)
    flip_bytes(damaged / "model.safetensors")
    # The run resumes from step 10 (the newest intact one) and saves again: the damaged
    # checkpoint of a later step must not count among the ones rotation keeps.
    assert latest_intact_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000010"
    save(tmp_path, 15, model, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000015", "step-00000020"]
    save(tmp_path, 18, model, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015", "step-00000018", "step-00000020"]
    save(tmp_path, 20, model, keep=2)  # reaching the damaged step replaces it with an intact one
    assert verify_checksums(tmp_path / "checkpoints" / "step-00000020")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000018", "step-00000020"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("trainer_state.json", b"{\"step\": 3,", "trainer_state.json: cannot be read"),
    ("trainer_state.json", b"[1, 2]", "trainer_state.json: cannot be read"),
    ("optimizer.pt", b"PK\x03\x04 truncated", "optimizer.pt: cannot be read"),
])
def test_unreadable_training_state_is_named(tmp_path, name, content, message):
    checkpoint = save(tmp_path, 1, tiny_model())
    (checkpoint / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_trainer_state(checkpoint)


def test_a_pickled_optimizer_file_is_refused_not_run(tmp_path):
    checkpoint = save(tmp_path, 1, tiny_model())
    torch.save({"optimizer": {}, "rng": {}, "payload": _Pickled()}, checkpoint / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt: cannot be read"):
        load_trainer_state(checkpoint)


class _Pickled:
    """Any object that is not a plain tensor or number: weights_only loading must refuse it."""


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 11, \"lo")  # cut short by a kill
    truncate_metrics(tmp_path, 5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------- the CLI
TRAIN = ["train", "--no-progress", "--max-steps", "6", "--data", "builtin", "--set", "seq_len=32",
         "--set", "vocab_size=300",
         "--set", "eval_interval=3", "--set", "save_interval=3", "--set", "log_interval=1",
         "--set", "sample_tokens=0"]


def metric_steps(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_resume_skips_a_damaged_checkpoint_and_writes_no_record_twice(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    flip_bytes(run / "checkpoints" / "step-00000006" / "model.safetensors")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipping checkpoint step-00000006" in captured.err and "model.safetensors" in captured.err
    assert "resuming from" in captured.out and "step-00000003" in captured.out
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]  # steps 4-6 replayed once, not appended twice
    assert verify_checksums(run / "checkpoints" / "step-00000006")


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    for checkpoint in list_checkpoints(run):  # as if killed before the first save
        shutil.rmtree(checkpoint)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    for checkpoint in list_checkpoints(run):
        shutil.rmtree(checkpoint)
    assert main([*TRAIN, "--out", str(run)]) == 0  # or started again without --resume
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]


def test_every_checkpoint_damaged_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run), "--set", "keep_checkpoints=1"]) == 0
    flip_bytes(run / "checkpoints" / "step-00000006" / "optimizer.pt", offset=-200)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and "damaged" in err[0] and "Traceback" not in err[0]


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("not a run")
    assert main([*TRAIN, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "not a run"


# ----------------------------------------------------- random damage, any file
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    save(root, 1, tiny_model())
    return root / "checkpoints" / "step-00000001"


FILES = ["config.json", "generation_config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"]


@given(name=st.sampled_from(FILES), data=st.binary(max_size=512), keep_checksums=st.booleans())
def test_random_bytes_in_any_checkpoint_file_fail_cleanly_naming_the_file(pristine, tmp_path_factory, name, data,
                                                                          keep_checksums):
    from arbor.training.trainer import Trainer

    run = tmp_path_factory.mktemp("damaged")
    checkpoint = run / "checkpoints" / pristine.name
    shutil.copytree(pristine, checkpoint)
    (checkpoint / name).write_bytes(data)
    if not keep_checksums:
        (checkpoint / CHECKSUMS).unlink()
    blocks = torch.randint(0, 48, (4, 16))
    try:
        Trainer.resume(checkpoint, blocks, blocks, run, progress=False, echo=lambda s: None)
    except ValueError as exc:  # CheckpointError, CheckpointIntegrityError, CheckpointReadError
        assert name in str(exc).splitlines()[0], str(exc)
    else:  # only a file no load depends on for correctness may be damaged and still load
        assert name == "generation_config.json" and not keep_checksums
