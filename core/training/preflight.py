"""Check a whole training run before any work: every problem at once, each naming its setting.

``arbor train`` calls `check_run` after reading its settings and before it loads
data, trains a tokenizer or builds a model, so a typo in a growth spec or a
missing GPU is found in a second, not when the first growth step fires.
``arbor train --check`` runs only this and prints the resolved run.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from arbor.growth.operators import GrowthError
from arbor.growth.step import parse_growth_spec
from arbor.model.config import KEY_ALIASES, ArborConfig, ArborConfigError, ArborConfigKeyError, closest_field
from arbor.plugins import get_registry
from arbor.training.config import trigger_choice
from arbor.training.data import NAMED_CORPORA
from arbor_plugins.settings import describe_validation_error

__all__ = ["RunCheckError", "check_model_settings", "check_run"]

#: Largest seed ``torch.manual_seed`` takes.
_MAX_SEED = 2**63 - 1


class RunCheckError(ValueError):
    """Settings of a run that cannot work; ``problems`` lists each as ``path=value: what is allowed``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        super().__init__(f"config: {problems[0]}{more}")


def check_run(config: Any, selection: Any = None) -> dict[str, Any]:
    """Check ``config`` (an `arbor.training.trainer.TrainConfig`) with the ``plugins.toml`` selection.

    Returns the resolved run (the model's architecture and the component each role
    will use); raises `RunCheckError` listing every problem found.
    """
    problems: list[str] = []
    resolved: dict[str, Any] = {}

    model_config = None
    try:
        model_config = check_model_settings(config.model, config.vocab_size)
    except (ValueError, ArborConfigError) as exc:
        problems.append(str(exc).removeprefix("config: "))
    if model_config is not None:
        resolved["model"] = {k: getattr(model_config, k) for k in (
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "substrate")}
        if config.seq_len > model_config.max_position_embeddings:
            problems.append(f"seq_len={config.seq_len}: must be <= the model's max_position_embeddings="
                            f"{model_config.max_position_embeddings}")
        problems += _check_growth(config, selection, resolved, model_config)
        problems += _check_substrate(model_config)
    problems += _check_data(config.data, config.tokenizer)
    problems += _check_device(config.device)
    if not 0 <= config.seed <= _MAX_SEED:
        problems.append(f"seed={config.seed}: must lie in [0, 2**63 - 1]")
    if problems:
        raise RunCheckError(problems)
    return resolved


#: Model settings a run takes from its tokenizer (`build_model`), so a value in the model table
#: would be replaced without a word.
_FROM_THE_TOKENIZER: dict[str, str] = {
    "vocab_size": "the vocabulary size is the tokenizer's; set the top-level vocab_size (the size of the BPE "
                  "a run trains) instead",
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), "the special-token ids are the tokenizer's"),
}
#: Keys of the model table that are not ArborConfig fields.
_MODEL_TABLE_KEYS = ("preset", "attn_implementation")


def check_model_settings(model: dict[str, Any], vocab_size: int) -> ArborConfig:
    """The `ArborConfig` the ``model`` table describes; else one line naming ``model.KEY``."""
    spec = dict(model)
    spec.pop("attn_implementation", None)
    for key, reason in _FROM_THE_TOKENIZER.items():
        if key in spec:
            raise ValueError(f"config: model.{key}={spec[key]!r} is invalid: {reason}")
    try:
        config = ArborConfig.from_preset(spec.pop("preset", "tiny"), **{**spec, "vocab_size": vocab_size})
    except ArborConfigKeyError as exc:
        fields = {f.name for f in dataclasses.fields(ArborConfig)}
        # Other libraries' names count as spellings of arbor's (num_layer: num_layers, so num_hidden_layers).
        aliases = {k for k, v in KEY_ALIASES.items() if v not in _FROM_THE_TOKENIZER}
        hint = closest_field(exc.field, (fields | set(_MODEL_TABLE_KEYS) | aliases) - set(_FROM_THE_TOKENIZER))
        hint = KEY_ALIASES.get(hint, hint)
        allowed = f"did you mean model.{hint}?" if hint else "the table takes preset, attn_implementation and " \
            "ArborConfig's fields (help(arbor.ArborConfig))"
        raise ValueError(f"config: model.{exc.field}={exc.value!r} is invalid: not a model setting; {allowed}") \
            from None
    except ArborConfigError as exc:
        raise ValueError(f"config: model.{exc.field}={exc.value!r} is invalid: {exc.allowed}") from None
    # A min_layers the run gives (not a preset's) bounds where it starts: growth only adds layers.
    if "min_layers" in spec and config.min_layers > config.num_hidden_layers:
        raise ValueError(f"config: model.min_layers={config.min_layers!r} is invalid: must be <= the starting depth, "
                         f"model.num_hidden_layers={config.num_hidden_layers}")
    return config


def _check_growth(config: Any, selection: Any, resolved: dict[str, Any], model_config: ArborConfig) -> list[str]:
    g, problems = config.growth, []
    trigger, trigger_settings = trigger_choice(config, selection)
    if g.step is not None:
        try:
            spec = parse_growth_spec(g.step)
        except GrowthError as exc:
            problems.append(f"growth.step={g.step!r}: {str(exc).removeprefix('growth: ')}")
        else:
            # Positions and layers are checked against the starting model; a later step's model is deeper.
            n = model_config.num_hidden_layers
            bad = [p for p in spec.positions or [] if not 0 <= p <= n]
            if bad:
                problems.append(f"growth.step.positions={spec.positions}: {bad} outside [0, {n}] "
                                f"(the model starts with {n} layers)")
            bad = [i for i in spec.layers or [] if not 0 <= i < n]
            if bad:
                problems.append(f"growth.step.layers={spec.layers}: {bad} outside [0, {n - 1}]")
    registry = get_registry()
    roles = [("trigger", trigger, trigger_settings, "growth.trigger"),
             ("init_scheme", g.init, None, "growth.init"),
             ("insertion_policy", g.insertion_policy, None, "growth.insertion_policy"),
             ("freeze_policy", g.freeze_policy, g.freeze_settings, "growth.freeze_policy")]
    for kind, name, settings, path in roles:
        if kind == "trigger" and not g.enabled:
            resolved[kind] = "none: growth.enabled = false, the run does not grow"
            if name is None:
                continue
        elif name is None:
            chosen = selection.name(kind) if selection is not None else None
            resolved[kind] = f"{chosen} (plugins.toml)" if chosen else "default"
            continue
        if not registry.has(kind, name):
            valid = ", ".join(registry.names(kind)) or "none are installed"
            problems.append(f"{path}={name!r}: not a registered {kind.replace('_', ' ')}; valid names: {valid}")
            continue
        resolved.setdefault(kind, name)
        if settings is None:
            continue
        try:
            registry.get(kind, name).validate_settings(settings)
        except ValidationError as exc:
            settings_path = path.replace("trigger", "trigger_settings").replace("freeze_policy", "freeze_settings")
            problems.append(describe_validation_error(exc, prefix=settings_path))
    if g.stages is not None:
        problems += _check_stages(g, trigger if g.enabled else None, trigger_settings, resolved)
    return problems


def _check_stages(g: Any, trigger: str | None, trigger_settings: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """Each stage's freeze policy and settings; a schedule has one stage more than it has growth steps."""
    problems, registry = [], get_registry()
    for k, stage in enumerate(g.stages):
        if stage.freeze_policy is None:
            continue
        path = f"growth.stages.{k}"
        if not registry.has("freeze_policy", stage.freeze_policy):
            valid = ", ".join(registry.names("freeze_policy")) or "none are installed"
            problems.append(f"{path}.freeze_policy={stage.freeze_policy!r}: not a registered freeze policy; "
                            f"valid names: {valid}")
            continue
        try:
            registry.get("freeze_policy", stage.freeze_policy).validate_settings(stage.freeze_settings)
        except ValidationError as exc:
            problems.append(describe_validation_error(exc, prefix=f"{path}.freeze_settings"))
    resolved["freeze_policy"] = "per stage: " + ", ".join(stage.freeze_policy or "-" for stage in g.stages)
    marks = (trigger_settings.get("steps") or trigger_settings.get("tokens")) if trigger == "schedule" else None
    if isinstance(marks, list) and len(g.stages) != len(marks) + 1:
        problems.append(f"growth.stages: {len(g.stages)} stages for a schedule of {len(marks)} growth steps; give "
                        f"{len(marks) + 1}, one from the start of the run and one from each growth step")
    return problems


def _check_substrate(model_config: ArborConfig) -> list[str]:
    registry = get_registry()
    name = model_config.substrate
    if not registry.has("substrate", name):
        return [f"model.substrate={name!r}: not a registered substrate; valid names: "
                f"{', '.join(registry.names('substrate'))}"]
    try:
        registry.get("substrate", name).validate_settings(model_config.substrate_settings)
    except ValidationError as exc:
        return [describe_validation_error(exc, prefix="model.substrate_settings")]
    return []


def _check_data(data: str, tokenizer: str) -> list[str]:
    problems = []
    if not data.strip():
        problems.append("data='': is empty; give 'builtin', 'stdlib', text files, a glob, a .jsonl file "
                        "or a saved dataset")
    elif data not in NAMED_CORPORA and not Path(data).expanduser().exists():
        if not any(c in data for c in "*?[") or not glob.glob(str(Path(data).expanduser()), recursive=True):
            problems.append(f"data={data!r}: matches no file or directory")
    if tokenizer not in ("auto", "bpe") and not Path(tokenizer).expanduser().exists():
        problems.append(f"tokenizer={tokenizer!r}: no such file or directory; give 'auto', 'bpe' or a "
                        "tokenizer.json (or a directory with one)")
    return problems


def _check_device(device: str) -> list[str]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return [f"device={device!r}: not a device; e.g. cpu, cuda, cuda:1, mps"]
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return [f"device={device!r}: this machine has no usable CUDA GPU (torch {torch.__version__})"]
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return [f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here"]
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return [f"device={device!r}: MPS is not available on this machine"]
    return []
