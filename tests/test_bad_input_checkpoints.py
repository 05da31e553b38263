"""Bad input and faults around checkpoints: ``arbor grow``, ``arbor export``, ``arbor generate``
and loading a checkpoint.

Each case asserts the exit code, one ``arbor: error:`` line on stderr naming what is at fault, no
traceback, and that every file the user had (the run, the checkpoint, the output directory) still
holds the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arbor.cli import main
from arbor.growth.growable import ArborForCausalLM
from arbor.model.checkpoint import CheckpointKeysError, write_checksums
from arbor.model.config import ArborConfig

TINY = ["--no-progress", "--set", "data=builtin", "--set", "seq_len=32", "--set", "vocab_size=300",
        "--set", "sample_tokens=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with its checkpoint (tokenizer included)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(run), "--max-steps", "2", *TINY]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run, for a test that may damage it."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def ckpt(run: Path) -> Path:
    (checkpoint,) = sorted((run / "checkpoints").iterdir())
    return checkpoint


def fingerprint(root: Path) -> dict[str, str]:
    """Hashes of every file under ``root``, symbolic links left unfollowed (so they are listed, not
    walked), to show a refused command left everything as it was."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            found[key] = f"-> {os.readlink(path)}" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("arbor: error: "), err
    assert all(f in errors[0] for f in fragments), err
    return errors[0]


def grow(checkpoint, out, *extra) -> list[str]:
    return ["grow", str(checkpoint), "--depth", "1", "--out", str(out), *extra]


def export(checkpoint, out, *extra) -> list[str]:
    return ["export", str(checkpoint), str(out), "--to", "llama", *extra]


COMMANDS = {"grow": grow, "export": export}


# ----------------------------------------------------------- 1. where a checkpoint may be written
def test_export_into_the_run_that_holds_the_checkpoint_deletes_nothing(run, tmp_path, capsys):
    before = fingerprint(tmp_path)
    assert main(export(ckpt(run), run, "--overwrite")) == 2
    one_error(capsys, f"OUT {run}", "contains the checkpoint")
    assert fingerprint(tmp_path) == before


def test_grow_into_the_run_that_holds_the_checkpoint_deletes_nothing(run, tmp_path, capsys):
    before = fingerprint(tmp_path)
    assert main(grow(ckpt(run), run, "--overwrite")) == 2
    one_error(capsys, f"--out {run}", "contains the checkpoint")
    assert fingerprint(tmp_path) == before


def _out(kind: str, run: Path, tmp: Path) -> Path:
    """An output directory of the given kind, made next to the run copy."""
    if kind == "checkpoints-folder":
        return run / "checkpoints"
    if kind == "inside-checkpoint":
        return ckpt(run) / "grown"
    if kind == "link-to-run":
        (tmp / "link").symlink_to(run, target_is_directory=True)
        return tmp / "link"
    if kind == "link-to-checkpoint":
        (tmp / "link").symlink_to(ckpt(run), target_is_directory=True)
        return tmp / "link"
    if kind == "other-run":
        other = tmp / "other-run"
        other.mkdir()
        (other / "train_config.json").write_text("{}")
        (other / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        return other
    if kind == "user-files":
        mine = tmp / "mine"
        mine.mkdir()
        (mine / "config.json").write_text("{}")  # a name arbor writes, next to one it does not
        (mine / "notes.txt").write_text("precious")
        return mine
    if kind == "user-subfolder":
        mine = tmp / "mine"
        (mine / "model.safetensors").mkdir(parents=True)  # arbor's name, but a folder: not arbor's
        (mine / "model.safetensors" / "data.bin").write_bytes(b"precious")
        return mine
    if kind == "a-file":
        (tmp / "a-file").write_text("precious")
        return tmp / "a-file"
    raise AssertionError(kind)


OUT_CASES = [
    ("checkpoints-folder", "contains the checkpoint"),
    ("inside-checkpoint", "lies inside the checkpoint"),
    ("link-to-run", "contains the checkpoint"),
    ("link-to-checkpoint", "is the checkpoint"),
    ("other-run", "is an arbor run directory (it holds metrics.jsonl)"),
    ("user-files", "holds notes.txt, which arbor did not write"),
    ("user-subfolder", "holds model.safetensors, which arbor did not write"),
    ("a-file", "is a file, not a directory"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize(("kind", "fragment"), OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_an_output_arbor_must_not_replace_is_refused(run, tmp_path, capsys, command, overwrite, kind, fragment):
    out = _out(kind, run, tmp_path)
    before = fingerprint(tmp_path)
    argv = COMMANDS[command](ckpt(run), out, *(["--overwrite"] if overwrite else []))
    assert main(argv) == 2
    one_error(capsys, str(out), fragment)
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_an_earlier_checkpoint_of_arbor_files(run, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert main(COMMANDS[command](ckpt(run), out)) == 0
    first = fingerprint(out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard of an earlier save")
    assert main(COMMANDS[command](ckpt(run), out)) == 2
    one_error(capsys, "exists and is not empty", "--overwrite")
    assert main(COMMANDS[command](ckpt(run), out, "--overwrite")) == 0
    assert fingerprint(out) == first  # the stale shard went with the rest of the earlier save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporaries left


# ----------------------------------------------------------- 3. weights that do not match the model
def _edit_weights(checkpoint: Path, how: str) -> None:
    """Drop a tensor from (or add one to) the weights, and rewrite checksums.json to match, as a
    careless hand edit or another tool's save would."""
    weights = load_file(checkpoint / "model.safetensors")
    if how == "missing":
        del weights["model.layers.1.mlp.up_proj.weight"]
    else:
        weights["model.layers.1.mlp.extra.weight"] = torch.zeros(4, 4)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    write_checksums(checkpoint)


LOADERS = {
    "generate": lambda run: ["generate", str(ckpt(run)), "The", "--max-new-tokens", "2"],
    "grow": lambda run: grow(ckpt(run), run.parent / "grown"),
    "export": lambda run: export(ckpt(run), run.parent / "exported"),
    "resume": lambda run: ["train", *TINY, "--out", str(run), "--resume", "--max-steps", "3"],
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("how", "fragment"), [("missing", "missing model.layers.1.mlp.up_proj.weight"),
                                               ("extra", "unexpected model.layers.1.mlp.extra.weight")])
def test_weights_missing_or_extra_tensors_are_refused(run, tmp_path, capsys, loader, how, fragment):
    _edit_weights(ckpt(run), how)
    before = fingerprint(tmp_path)
    assert main(LOADERS[loader](run)) == 2
    one_error(capsys, fragment)
    assert fingerprint(tmp_path) == before


def _tiny(**overrides) -> ArborForCausalLM:
    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=64, **overrides))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_head_is_required_unless_tied(tmp_path, tied):
    model = _tiny(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert ("lm_head.weight" in saved) is not tied  # a tied head is the embedding: not saved
    loaded = ArborForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    if not tied:
        del saved["lm_head.weight"]
        save_file(saved, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
        write_checksums(tmp_path / "ckpt")
        with pytest.raises(CheckpointKeysError, match=r"missing lm_head\.weight"):
            ArborForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_many_missing_tensors_are_counted(tmp_path):
    _tiny().save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    layer0 = [k for k in saved if k.startswith("model.layers.0.")]
    save_file({k: v for k, v in saved.items() if k not in layer0}, tmp_path / "ckpt" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "ckpt" / "checksums.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointKeysError, match=rf"\(and {len(layer0) - 3} more; {len(layer0)} in all\)"):
        ArborForCausalLM.from_pretrained(tmp_path / "ckpt")


# ----------------------------------------------------------- 4. generate within the model's limits
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--max-new-tokens", "700"], ["--max-new-tokens 700", "max_position_embeddings=512", "prompt (2 tokens)"]),
        (["--temperature", "nan"], ["--temperature nan", "finite"]),
        (["--temperature", "inf"], ["--temperature inf", "finite"]),
        (["--top-k", "-1"], ["--top-k -1", ">= 0"]),
    ],
    ids=["past-positions", "nan-temperature", "inf-temperature", "negative-top-k"],
)
def test_generate_refuses_what_it_cannot_do(trained, capsys, monkeypatch, extra, fragments):
    monkeypatch.setattr(ArborForCausalLM, "generate", lambda *a, **k: pytest.fail("generated anyway"))
    assert main(["generate", str(ckpt(trained)), "The", *extra]) == 2
    one_error(capsys, *fragments)


def test_generate_refuses_a_prompt_longer_than_the_context(trained, capsys, monkeypatch):
    monkeypatch.setattr(ArborForCausalLM, "generate", lambda *a, **k: pytest.fail("generated anyway"))
    assert main(["generate", str(ckpt(trained)), "the cat sat on the mat. " * 100, "--max-new-tokens", "1"]) == 2
    line = one_error(capsys, "max_position_embeddings=512", "--max-new-tokens 1")
    assert int(line.split("prompt (")[1].split(" tokens")[0]) > 512


# ----------------------------------------------------------- 5. a disk that fails while writing
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_only(directory, *args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", ["full-disk", "read-only"])
def test_a_failing_disk_leaves_the_checkpoint_and_the_earlier_output(run, tmp_path, capsys, monkeypatch, command,
                                                                     fault):
    import arbor.growth.export

    out = tmp_path / "out"
    assert main(COMMANDS[command](ckpt(run), out)) == 0  # an earlier output, to be replaced
    capsys.readouterr()
    before = fingerprint(tmp_path)
    failure = _full_disk if fault == "full-disk" else _read_only
    if command == "grow":
        monkeypatch.setattr(ArborForCausalLM, "save_pretrained", lambda self, *a, **k: failure(*a, **k))
    else:
        monkeypatch.setattr(arbor.growth.export, "_save", lambda sd, config, gen, directory, dtype: failure(directory))
    assert main(COMMANDS[command](ckpt(run), out, "--overwrite")) in (1, 2)
    reason = "No space left on device" if fault == "full-disk" else "Permission denied"
    one_error(capsys, f"cannot write {out}", reason, "left as it was")
    assert fingerprint(tmp_path) == before  # the run, its checkpoint and the earlier output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporaries left
