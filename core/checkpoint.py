"""Checks on checkpoint directories before transformers loads them.

transformers reports a tensor whose shape disagrees with the config in a log
table and then raises a generic error; a grown model makes such mismatches a
real possibility (a config edited by hand, a half-copied directory), so arbor
checks first and names the tensor and both shapes in the error itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not have the shapes its config describes."""


def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor name → shape for the safetensors weights in ``directory`` (None if there are none)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_checkpoint_shapes(directory: str | os.PathLike, model_class, config) -> None:
    """Raise `CheckpointMismatchError` if a tensor in ``directory`` does not fit ``config``."""
    found = checkpoint_shapes(directory)
    if not found:
        return
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    problems = []
    for name, shape in found.items():
        # A base model loads from a causal-LM checkpoint and the other way round.
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if candidate in expected:
                if expected[candidate] != shape:
                    problems.append((name, shape, expected[candidate]))
                break
    if problems:
        name, shape, want = problems[0]
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(directory)} does not match its config: tensor {name} has shape "
            f"{list(shape)} in the file but the config needs {list(want)}{more}"
        )
