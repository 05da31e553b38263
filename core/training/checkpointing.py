"""Training checkpoints that survive crashes.

A checkpoint is a Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json``, tokenizer files) plus the
trainer's state: ``trainer_state.json`` (step, tokens, growth history, trigger
state, the optimizer's groups by parameter name, settings) and
``optimizer.pt`` (optimizer tensors and RNG states; plain tensors and numbers
only, read back with ``torch.load(weights_only=True)``, so no pickled code).

Writes are atomic: everything goes into a hidden sibling directory that is
renamed into place only when complete, so a crash or a kill during a save
leaves the previous checkpoint as it was. Every checkpoint carries
``checksums.json`` (SHA-256 of each file); a new checkpoint is read back and
checked before older ones are rotated away, so the last ``keep`` survive and
rotation never removes the only intact one. Resuming skips a damaged
checkpoint, naming the file, in favour of the newest intact one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from arbor.model.checkpoint import CheckpointIntegrityError, verify_checksums, write_checksums
from arbor.training.tokenizer import save_tokenizer

PREFIX = "step-"
STATE = "trainer_state.json"
TENSORS = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint directory is missing or incomplete (one-line message)."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir``, intact or not (see `latest_intact_checkpoint`)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: str | Path, warn=None) -> Path | None:
    """The newest checkpoint whose files match their checksums; damaged ones are skipped,
    each named through ``warn(message)`` when given."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checksums(checkpoint)
        except CheckpointIntegrityError as exc:
            if warn is not None:
                warn(f"skipping checkpoint {checkpoint.name}: {exc}")
            continue
        return checkpoint
    return None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    tokenizer=None, keep: int = 3, components: dict[str, Any] | None = None,
                    model_state: dict[str, Any] | None = None, optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``.

    ``components`` is the plugins' training state (`arbor.plugins.component_state`),
    saved beside the optimizer state. ``model_state`` and ``optimizer_state`` replace
    ``model.state_dict()`` and ``optimizer.state_dict()`` (a sharded run passes them gathered whole).
    """
    from transformers.utils import logging as hf_logging

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*"):  # left by a save that was killed: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the trainer's own progress bar is enough
    try:
        model.save_pretrained(tmp, **({} if model_state is None else {"state_dict": model_state}))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, model.config.max_position_embeddings)  # the model's context, not 1e30
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"] if id(p) in names] for g in optimizer.param_groups]
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optimizer_state, "rng": rng_state(), "components": components or {}},
                   tmp / TENSORS)
        state = {**trainer_state, "step": step, "optimizer_groups": groups, "python_rng": _python_rng()}
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        write_checksums(tmp)
        if final.exists():  # a re-save of the same step replaces it only once the new one is complete
            old = root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _fsync_dir(root)
    # Read the new checkpoint back before rotating: if the disk did not keep what was written,
    # the older checkpoints are all there is, and none of them may go.
    verify_checksums(final)
    # Rotation counts only this run's history up to the new checkpoint: checkpoints of later steps
    # (left by a run resumed from an earlier one, e.g. past a damaged checkpoint) are replaced as the
    # run reaches their steps, and never push an intact one out.
    history = [c for c in list_checkpoints(run_dir) if c.name <= final.name]
    for stale in history[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainer_state, tensors)`` of a checkpoint; tensors hold the optimizer state, RNG states and
    the plugins' training state (``"components"``, absent from older checkpoints)."""
    path = Path(checkpoint)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (needs {STATE} and {TENSORS})")
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not {"step", "tokens", "config", "optimizer_groups"} <= state.keys():
            raise ValueError("expected a table with step, tokens, config and optimizer_groups")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / STATE}: cannot be read: {_first_line(exc)}") from None
    try:
        # weights_only: a file holding pickled code is refused, never run.
        tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or not {"optimizer", "rng"} <= tensors.keys():
            raise ValueError("expected a dict with optimizer and rng")
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickled objects, wrong layout: one line naming the file
        raise CheckpointError(f"{path / TENSORS}: cannot be read: {_first_line(exc)}") from None
    return state, tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def restore_optimizer(make_optimizer, model, state: dict[str, Any], tensors: dict[str, Any]):
    """An optimizer over ``model`` with the saved groups (by parameter name) and state."""
    params = dict(model.named_parameters())
    missing = [n for group in state["optimizer_groups"] for n in group if n not in params]
    if missing:
        raise CheckpointError(f"the optimizer state names parameters the model does not have: {missing[:3]}")
    groups = [{"params": [params[n] for n in group]} for group in state["optimizer_groups"]]
    optimizer = make_optimizer(groups)
    optimizer.load_state_dict(tensors["optimizer"])
    return optimizer


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_python_rng(saved: list | None) -> None:
    if saved:
        random.setstate((saved[0], tuple(saved[1]), saved[2]))


def _fsync_dir(path: Path) -> None:
    try:  # make the rename durable where the platform allows it
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
