"""Check a whole training run before any work: every problem at once, each naming its setting.

``arbor train`` calls `check_run` after reading its settings and before it loads
data, trains a tokenizer or builds a model, so a typo in a growth spec or a
missing GPU is found in a second, not when the first growth step fires.
``arbor train --check`` runs only this and prints the resolved run.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from arbor.growth.operators import GrowthError
from arbor.growth.step import parse_growth_spec
from arbor.model.attention import check_attention_device, resolve_attn_implementation
from arbor.model.config import KEY_ALIASES, ArborConfig, ArborConfigError, ArborConfigKeyError, closest_field
from arbor.plugins import PluginError, get_registry, unwrap
from arbor.plugins.selection import validate_component_settings
from arbor.training.card_config import settings_problems
from arbor.training.config import TrainConfig, trigger_choice
from arbor.training.data import NAMED_CORPORA
from arbor_plugins import DEFAULTS, Substrate, UserError
from arbor_plugins.settings import describe_validation_error

__all__ = ["BPE_MIN_VOCAB", "RunCheckError", "check_model_settings", "check_run", "validate_run_settings"]

#: Largest seed ``torch.manual_seed`` takes.
_MAX_SEED = 2**63 - 1
#: The smallest vocabulary `arbor.training.tokenizer.train_bpe` trains: its 256 byte symbols and the
#: three special tokens (bos, eos, pad); a test holds the two equal.
BPE_MIN_VOCAB = 256 + 3
#: Devices a run trains on (``cuda`` and ``cuda:N``, ``mps``, ``cpu``); torch parses others (meta,
#: xpu, ...) that arbor's training does not support.
_DEVICE_TYPES = ("cpu", "cuda", "mps")


class RunCheckError(ValueError):
    """Settings of a run that cannot work; ``problems`` lists each as ``path=value: what is allowed``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        super().__init__(f"config: {problems[0]}{more}")


def check_run(config: Any, selection: Any = None) -> dict[str, Any]:
    """Check ``config`` (an `arbor.training.trainer.TrainConfig`) with the ``plugins.toml`` selection.

    Returns the resolved run (the model's architecture and the component each role
    will use); raises `RunCheckError` listing every problem found. Each check looks at
    its own settings, so one bad setting does not hide the problems of another.
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
        problems += _check_substrate(model_config)
    problems += _check_growth(config, selection, resolved, model_config)
    device_problems = _check_device(config.device)
    problems += device_problems
    problems += _check_attention(config, selection, None if device_problems else config.device)
    problems += _check_data(config.data, config.tokenizer)
    problems += _check_vocab(config)
    if not 0 <= config.seed <= _MAX_SEED:
        problems.append(f"seed={config.seed}: must lie in [0, 2**63 - 1]")
    if config.sample_tokens and not config.sample_prompt:
        # The sample is taken after the whole run has trained: an empty prompt fails only then.
        problems.append("sample_prompt='': is empty, and the sample after training continues it; give a prompt "
                        "(e.g. 'The') or set sample_tokens = 0 for no sample")
    if problems:
        raise RunCheckError(problems)
    return resolved


def validate_run_settings(data: dict[str, Any], selection: Any = None) -> TrainConfig:
    """``data`` (the settings a run was given) as a `TrainConfig`.

    When the settings do not validate, the `RunCheckError` lists every problem at once: each
    validation error, and what `check_run` finds in the settings that did validate (the failing
    ones are left at their defaults for it, and its problems about them are not repeated).
    """
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems, locations = settings_problems(exc), [error["loc"] for error in exc.errors()]
    paths = [_setting_at(data, loc) for loc in locations]
    if None in paths:  # an error about the whole table: nothing left to check the rest with
        raise RunCheckError(problems)
    rest = copy.deepcopy(data)
    for path in sorted(set(paths), key=len):
        _remove(rest, path)
    try:
        config = TrainConfig.model_validate(rest)
        check_run(config, selection)
    except ValidationError:  # the defaults put in do not fit what is left (a rare cross-field check)
        pass
    except RunCheckError as more:
        problems += [p for p in more.problems if not _about(p, [".".join(path) for path in paths])]
    raise RunCheckError(problems)


def _setting_at(data: Any, loc: tuple[Any, ...]) -> tuple[str, ...] | None:
    """The keys of the setting a validation error at ``loc`` is about: down through tables, to the
    first value that is not one (``betas.0``: betas). None when ``loc`` names no key of ``data``."""
    node, path = data, []
    for i, part in enumerate(loc):
        if not isinstance(node, dict) or part not in node:
            return None
        path.append(part)
        if i == len(loc) - 1 or not isinstance(node[part], dict):
            return tuple(path)
        node = node[part]
    return None


def _remove(data: dict[str, Any], path: tuple[str, ...]) -> None:
    node = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)  # gone already when a table above it was removed


def _about(problem: str, paths: list[str]) -> bool:
    """Whether ``problem`` (``path=value: ...`` or ``path: ...``) is about one of ``paths`` or inside one."""
    match = re.match(r"[\w.\[\]-]+", problem)
    where = match.group(0).split("[")[0] if match else ""
    return any(where == p or where.startswith(p + ".") for p in paths)


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
    except (TypeError, AttributeError, KeyError, ValueError) as exc:  # transformers' own keys (dtype, id2label)
        key = _culprit(spec, vocab_size) or "<table>"
        raise ValueError(f"config: model.{key}={spec.get(key)!r} is invalid: transformers cannot read it "
                         f"({type(exc).__name__}: {exc})") from None
    # A min_layers the run gives (not a preset's) bounds where it starts: growth only adds layers.
    if "min_layers" in spec and config.min_layers > config.num_hidden_layers:
        raise ValueError(f"config: model.min_layers={config.min_layers!r} is invalid: must be <= the starting depth, "
                         f"model.num_hidden_layers={config.num_hidden_layers}")
    return config


def _culprit(spec: dict[str, Any], vocab_size: int) -> str | None:
    """The key of the model table that alone makes building the config fail."""
    for key, value in spec.items():
        try:
            ArborConfig.from_preset("tiny", **{key: value, "vocab_size": vocab_size})
        except Exception:  # noqa: BLE001 - any failure marks the key
            return key
    return None


def _check_growth(config: Any, selection: Any, resolved: dict[str, Any], model_config: ArborConfig | None) -> list[str]:
    """The growth settings; those measured against the starting model only when it could be built."""
    g, problems = config.growth, []
    trigger, trigger_settings = trigger_choice(config, selection)
    if g.step is not None:
        try:
            spec = parse_growth_spec(g.step)
        except GrowthError as exc:
            problems.append(f"growth.step={g.step!r}: {str(exc).removeprefix('growth: ')}")
        else:
            if model_config is not None:
                problems += _check_step_layers(spec, model_config.num_hidden_layers)
            if model_config is not None and model_config.num_hidden_layers == 0 and g.enabled:
                problems += _check_first_step_from_nothing(spec.axis, spec.init or g.init, selection)
    elif model_config is not None and model_config.num_hidden_layers == 0 and g.enabled:
        problems += _check_first_step_from_nothing("depth", g.init, selection)  # the default step adds depth
    roles = [("trigger", trigger, trigger_settings, "growth.trigger"),
             ("init_scheme", g.init, None, "growth.init"),
             ("insertion_policy", g.insertion_policy, None, "growth.insertion_policy"),
             ("freeze_policy", g.freeze_policy, g.freeze_settings, "growth.freeze_policy")]
    registry = get_registry()
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
        if settings is not None:
            settings_path = path.replace("trigger", "trigger_settings").replace("freeze_policy", "freeze_settings")
            problems += _check_component_settings(kind, name, settings, settings_path)
    if g.stages is not None:
        problems += _check_stages(g, trigger if g.enabled else None, trigger_settings, resolved)
    if model_config is not None and g.enabled and not problems:
        problems += _check_depth_budget(config, selection, trigger, trigger_settings, model_config)
    return problems


def _check_first_step_from_nothing(axis: str, init: str | None, selection: Any) -> list[str]:
    """A model that starts with no layers can only grow depth first, with an init that needs no layer to copy
    (stages that change the step or the init later are not followed here)."""
    if axis in ("ffn", "heads"):
        return [f"growth.step.axis={axis!r}: the model starts with no layers (model.num_hidden_layers=0), "
                "so its first step must add depth (axis 'depth') or hidden size"]
    if axis != "depth":
        return []
    name = init or (selection.name("init_scheme") if selection is not None else None) or DEFAULTS["init_scheme"]
    registry = get_registry()
    if registry.has("init_scheme", name) and getattr(unwrap(registry.get("init_scheme", name)), "copies_layers", False):
        return [f"growth.init={name!r}: builds new layers from existing ones, but the model starts with no layers "
                "(model.num_hidden_layers=0); choose an init that needs none, e.g. 'zero'"]
    return []


def _check_step_layers(spec: Any, n: int) -> list[str]:
    # Positions and layers are checked against the starting model; a later step's model is deeper.
    problems = []
    bad = [p for p in spec.positions or [] if not 0 <= p <= n]
    if bad:
        problems.append(f"growth.step.positions={spec.positions}: {bad} outside [0, {n}] "
                        f"(the model starts with {n} layers)")
    bad = [i for i in spec.layers or [] if not 0 <= i < n]
    if bad:
        problems.append(f"growth.step.layers={spec.layers}: {bad} outside [0, {n - 1}]")
    return problems


def _check_component_settings(kind: str, name: str, settings: Any, path: str) -> list[str]:
    """The component's own check of its settings; a plugin failing in it is named, not a traceback."""
    try:
        validate_component_settings(get_registry().get(kind, name), kind, name, settings)
    except ValidationError as exc:
        return [describe_validation_error(exc, prefix=path)]
    except (UserError, PluginError) as exc:
        return [f"{path}: {str(exc).splitlines()[0]}"]
    return []


def _check_depth_budget(config: Any, selection: Any, trigger: str | None, trigger_settings: dict[str, Any],
                        model_config: ArborConfig) -> list[str]:
    """A schedule whose depth steps would take the model past ``model.max_layers``: the growth step
    that would cross it fails mid-run, after the steps before it trained. The steps counted are the
    ones the trainer takes (`Trainer.fit` asks the trigger after each step before the last, and takes
    one growth step at most each time); other triggers decide as they go and stop at the limit."""
    if trigger is None and selection is not None and selection.name("trigger") == "schedule":
        trigger, trigger_settings = "schedule", selection.settings("trigger").model_dump()
    if trigger != "schedule" or model_config.max_layers is None:
        return []
    try:
        schedule = get_registry().get("trigger", "schedule").validate_settings(trigger_settings)
    except Exception:  # noqa: BLE001 - a bad schedule is reported with its settings above
        return []
    by_tokens = schedule.steps is None
    marks = schedule.tokens if by_tokens else schedule.steps
    per_step = config.batch_size * config.grad_accum * config.seq_len
    depth, step = model_config.num_hidden_layers, 0
    for i, mark in enumerate(marks):
        step = max(math.ceil(mark / per_step) if by_tokens else mark, step + 1)
        if step >= config.max_steps:
            break
        growth = schedule.growth[i] if isinstance(schedule.growth, list) else schedule.growth
        if growth is None:  # as `GrowthStep.resolve` falls back: the config's step, the model's, the default
            growth = config.growth.step if config.growth.step is not None else model_config.growth
        try:
            spec = parse_growth_spec(growth)
        except GrowthError:
            return []  # reported with the step that holds it
        if spec.axis == "depth":
            depth += spec.num_layers
        if depth > model_config.max_layers:
            return [f"growth: growth step {i + 1} of the schedule (at step {step}) would grow the model to "
                    f"{depth} layers, past model.max_layers={model_config.max_layers} (it starts with "
                    f"{model_config.num_hidden_layers}); add fewer layers per step, give fewer marks or raise "
                    "model.max_layers"]
    return []


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
        problems += _check_component_settings("freeze_policy", stage.freeze_policy, stage.freeze_settings,
                                              f"{path}.freeze_settings")
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
    return _check_component_settings("substrate", name, model_config.substrate_settings, "model.substrate_settings")


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
    if parsed.type not in _DEVICE_TYPES:
        return [f"device={device!r}: arbor trains on cpu, cuda, cuda:N or mps, not on {parsed.type}"]
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return [f"device={device!r}: this machine has no usable CUDA GPU (torch {torch.__version__})"]
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return [f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here"]
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return [f"device={device!r}: MPS is not available on this machine"]
    return []


def _check_attention(config: Any, selection: Any, device: str | None) -> list[str]:
    """The attention backend the model table (or plugins.toml) names: registered, usable here and on
    ``device`` (None: the device is refused already)."""
    name = config.model.get("attn_implementation")
    path = "model.attn_implementation"
    if name is None and selection is not None and selection.name("attention_backend"):
        name, path = selection.name("attention_backend"), "plugins.toml [attention_backend].name"
    if name is None:
        return []
    try:
        implementation = resolve_attn_implementation(name)
        if device is not None:
            check_attention_device(implementation, torch.device(device))
    except (ValueError, RuntimeError) as exc:  # PluginError too: a backend's is_available() failed
        reason = str(exc).splitlines()[0].removeprefix(f"attn_implementation={name!r} ").removeprefix("is ")
        return [f"{path}={name!r}: {reason}"]
    return []


def _check_vocab(config: Any) -> list[str]:
    """``vocab_size`` is the size of the BPE a run trains: too small for one, train_bpe would refuse it
    only after the data is read."""
    if config.vocab_size >= BPE_MIN_VOCAB or not _trains_bpe(config):
        return []
    return [f"vocab_size={config.vocab_size}: a byte-level BPE needs at least {BPE_MIN_VOCAB} tokens (256 bytes "
            f"+ 3 special tokens); give vocab_size >= {BPE_MIN_VOCAB}"]


def _trains_bpe(config: Any) -> bool:
    """Whether the run trains a BPE: asked to, or ``auto`` with a substrate that brings no tokenizer
    (one whose ``default_tokenizer`` may answer None for some settings is given the benefit of the doubt)."""
    if config.tokenizer != "auto":
        return config.tokenizer == "bpe"
    name = config.model.get("substrate")
    if name is None:
        return True
    registry = get_registry()
    if not isinstance(name, str) or not registry.has("substrate", name):
        return False  # reported as a bad substrate
    return type(unwrap(registry.get("substrate", name))).default_tokenizer is Substrate.default_tokenizer
