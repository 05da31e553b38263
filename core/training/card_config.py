"""The Arbor card's config keys, read as arbor's settings.

The Arbor-500M-1B model card configures training with a YAML file in its own keys::

    model:
      num_layers: 24
      growth:
        enabled: true            # the card's FFN growth
        factor: 2.0
        layer_growth_enabled: true
        min_layers: 24
        max_layers: 64
        layer_growth_threshold: 0.92
        layer_growth_factor: 4
        layer_growth_cooldown: 5000
    training:
      learning_rate: 2e-5
      per_device_train_batch_size: 4

(other versions of the card put the ``layer_growth_*``, ``min_layers`` and ``max_layers`` keys
in a top-level ``growth`` table). `translate_card_keys` turns such a table into arbor's own
settings in one step, before they are validated, and says what it did: every card key it read,
and into which setting. The tables below are the whole translation; docs/card-config.md shows
them as one table. A card key arbor has no equivalent for is refused with the reason, except the
card's FFN growth, which is reported and not run (see `FFN_GROWTH_NOT_RUN`).

`describe_settings_error` condenses a validation error of the translated settings to one line,
adding to each unknown key the allowed key nearest to it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from arbor.model.config import KEY_ALIASES, ArborConfig, closest_field
from arbor.training.config import TrainConfig

__all__ = ["CARD_GROWTH_KEYS", "CARD_MODEL_KEYS", "CARD_TRAINING_KEYS", "FOREIGN_NAMES", "CardTranslation",
           "describe_settings_error", "settings_problems", "translate_card_keys"]


@dataclass(frozen=True)
class CardKey:
    """One card key: the arbor setting it becomes (a dotted path; None where it is not one setting)
    and what it means in arbor, as the notice and the docs table say it."""

    arbor: str | None
    meaning: str


#: Keys of the card's ``model`` table that arbor names differently (``hidden_size`` is the same
#: in both and needs no translation).
CARD_MODEL_KEYS: dict[str, CardKey] = {
    "num_layers": CardKey("model.num_hidden_layers", "the starting depth"),
    "vocab_size": CardKey("vocab_size", "the size of the BPE tokenizer the run trains (the model's vocabulary "
                                        "is its tokenizer's)"),
}

#: The utilization trigger with Arbor's rule: new layers at the middle of the stack.
_CARD_TRIGGER = {"growth.trigger": "utilization", "growth.insertion_policy": "middle"}

#: Keys of the card's growth table, ``model.growth`` or top-level ``growth``.
CARD_GROWTH_KEYS: dict[str, CardKey] = {
    "layer_growth_enabled": CardKey("growth.enabled", "true: depth growth by the card's trigger (growth.trigger = "
                                                      "utilization, insertion_policy = middle); false: growth off"),
    "min_layers": CardKey("model.min_layers", "the smallest depth; the starting depth when no layer count is "
                                              "given, and at most the starting depth"),
    "max_layers": CardKey("model.max_layers", "the depth growth stops at"),
    "layer_growth_threshold": CardKey("growth.trigger_settings.threshold", "the utilization a layer must exceed "
                                      "(the share of layers that must, 80 %, is trigger_settings.fraction)"),
    "layer_growth_cooldown": CardKey("growth.trigger_settings.cooldown", "steps after a growth step before the "
                                                                          "next may fire"),
    "layer_growth_factor": CardKey("growth.trigger_settings.num_layers", "layers added per growth step, at the "
                                   "middle; also growth.step = {axis: depth, num_layers: N}"),
    "enabled": CardKey(None, "the card's FFN growth: not run by arbor (a warning says so when true)"),
    "factor": CardKey(None, "the card's FFN growth multiplier: not run by arbor"),
}
#: Card growth keys that only the card's ``model.growth`` table holds: in a top-level ``growth``
#: table ``enabled`` is arbor's own switch (growth on or off).
_MODEL_GROWTH_ONLY = ("enabled", "factor")
#: Any of these in ``model.growth`` makes it the card's growth table rather than arbor's growth step.
_CARD_GROWTH_MARKERS = frozenset(CARD_GROWTH_KEYS) - {"factor"}

#: Keys of the card's ``training`` table (Hugging Face `TrainingArguments` names) that have an
#: arbor setting meaning the same thing.
CARD_TRAINING_KEYS: dict[str, CardKey] = {
    "learning_rate": CardKey("lr", "the peak learning rate"),
    "per_device_train_batch_size": CardKey("batch_size", "blocks per step (arbor's batch_size is the global "
                                                         "batch: in N processes, give N times the card's)"),
    "gradient_accumulation_steps": CardKey("grad_accum", "micro-batches per optimizer step"),
    "max_steps": CardKey("max_steps", "optimizer steps"),
    "warmup_steps": CardKey("warmup_steps", "linear warm-up steps"),
    "weight_decay": CardKey("weight_decay", "AdamW's decoupled weight decay"),
    "max_grad_norm": CardKey("grad_clip", "clipping by global norm"),
    "seed": CardKey("seed", "the run's seed"),
    "bf16": CardKey("bf16", "bf16 autocast"),
    "gradient_checkpointing": CardKey("gradient_checkpointing", "recompute activations in the backward pass"),
    "logging_steps": CardKey("log_interval", "steps between training records"),
    "eval_steps": CardKey("eval_interval", "steps between validation losses"),
    "save_steps": CardKey("save_interval", "steps between checkpoints"),
    "save_total_limit": CardKey("keep_checkpoints", "checkpoints kept"),
}

#: `TrainingArguments` keys a card may hold that arbor has no equivalent for: why, and what to use.
REFUSED_TRAINING_KEYS: dict[str, str] = {
    "num_train_epochs": "arbor trains for a number of optimizer steps; set max_steps",
    "fp16": "arbor trains in fp32 or with bf16 autocast; set bf16",
    "lr_scheduler_type": "arbor's schedule is linear warm-up, then cosine decay to lr x min_lr_ratio",
    "adam_beta1": "set betas = [beta1, beta2]",
    "adam_beta2": "set betas = [beta1, beta2]",
    "per_device_eval_batch_size": "evaluation uses batch_size",
    "output_dir": "give the run directory as arbor train --out",
}

#: What a run with the card's FFN growth switched on is told.
FFN_GROWTH_NOT_RUN = (
    "the card's FFN growth is not run: a run grows one way, and the card's layer growth is the one arbor "
    "takes. To grow the FFN instead, give growth.step = {axis: ffn, factor: F} with a trigger that leaves "
    "the step to it (e.g. schedule)"
)


@dataclass
class CardTranslation:
    """The settings with the card's keys replaced by arbor's, and what was done: ``notes`` has one
    ``card key = value -> arbor setting = value`` line per card key, ``warnings`` what is not run."""

    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def notice(self, source: str) -> str:
        """The lines printed on stderr ('' when the settings held no card key)."""
        if not self.notes and not self.warnings:
            return ""
        lines = [f"note: {source}: the Arbor card's keys, read as arbor's settings (docs/card-config.md):"]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


class _Writer:
    """Writes arbor settings into the translated table, refusing to overwrite a different value."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.written: dict[str, tuple[Any, str]] = {}  # arbor path -> (value, the card key that wrote it)

    def put(self, path: str, value: Any, card: str) -> str:
        *tables, name = path.split(".")
        node = self.settings
        for i, part in enumerate(tables):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"config: {'.'.join(tables[:i + 1])} must be a table (the card's {card} "
                                 f"writes {path} into it)")
            node = child
        if name in node and node[name] != value:
            given = f"the card's {self.written[path][1]}" if path in self.written else path
            raise ValueError(f"config: {card} = {_show(value)} sets {path}, but {given} sets it to "
                             f"{_show(node[name])}; give one")
        node[name] = value
        self.written[path] = (value, card)
        return f"{path} = {_show(value)}"


def translate_card_keys(settings: dict[str, Any]) -> CardTranslation:
    """``settings`` (a config file's table) with the Arbor card's keys replaced by arbor's.

    Raises ValueError (one line, naming the key) for a card key arbor cannot honour, for a card key
    and an arbor setting that disagree, and for an unknown key in a table only the card uses.
    """
    out = copy.deepcopy(settings)
    result = CardTranslation(out)
    writer = _Writer(out)
    model = out.get("model")
    if isinstance(model, dict):
        for key in [k for k in CARD_MODEL_KEYS if k in model]:
            value, card = model.pop(key), f"model.{key}"
            result.notes.append(f"{card} = {_show(value)} -> {writer.put(CARD_MODEL_KEYS[key].arbor, value, card)}")
        growth = model.get("growth")
        if isinstance(growth, dict) and _CARD_GROWTH_MARKERS & set(growth):
            _translate_growth(model.pop("growth"), "model.growth", writer, result)
    growth = out.get("growth")
    if isinstance(growth, dict):
        card = {k: growth.pop(k) for k in list(growth) if k in CARD_GROWTH_KEYS and k not in _MODEL_GROWTH_ONLY}
        if card:
            _translate_growth(card, "growth", writer, result)
    training = out.pop("training", None)
    if training is not None:
        _translate_training(training, writer, result)
    return result


def _translate_training(training: Any, writer: _Writer, result: CardTranslation) -> None:
    if not isinstance(training, dict):
        raise ValueError(f"config: training = {_show(training)}: the card's training table must be a table")
    for key, value in training.items():
        path = f"training.{key}"
        if key in CARD_TRAINING_KEYS:
            arbor = CARD_TRAINING_KEYS[key].arbor
            if isinstance(value, str) and TrainConfig.model_fields[arbor].annotation is float:
                value = _number(value)  # YAML 1.1 reads 2e-5 (no dot) as a string
            result.notes.append(f"{path} = {_show(value)} -> {writer.put(arbor, value, path)}")
        elif key in REFUSED_TRAINING_KEYS:
            raise ValueError(f"config: {path}: the card's setting has no arbor equivalent: "
                             f"{REFUSED_TRAINING_KEYS[key]}")
        else:
            raise ValueError(f"config: {path}: unknown setting; {_nearest(key, 'training.')}")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # validation names it


def _nearest(key: str, prefix: str) -> str:
    """'did you mean ...?' for an unknown key of the card's training table."""
    if key in TrainConfig.model_fields:  # arbor's own name, one level too deep
        return f"did you mean {key} (at the top level)?"
    hint = closest_field(key, [*CARD_TRAINING_KEYS, *REFUSED_TRAINING_KEYS])
    if hint in CARD_TRAINING_KEYS:
        return f"did you mean {prefix}{hint}?"
    return f"the card's training table takes {', '.join(CARD_TRAINING_KEYS)}"


def _translate_growth(table: dict[str, Any], where: str, writer: _Writer, result: CardTranslation) -> None:
    unknown = [k for k in table if k not in CARD_GROWTH_KEYS]
    if unknown:
        hint = closest_field(unknown[0], CARD_GROWTH_KEYS)
        allowed = (f"did you mean {where}.{hint}?" if hint
                   else f"the card's growth table takes {', '.join(CARD_GROWTH_KEYS)}")
        raise ValueError(f"config: {where}.{unknown[0]}: unknown setting in the card's growth table; {allowed}")
    note = result.notes.append
    layer_keys = [k for k in table if k.startswith("layer_growth_")]
    if layer_keys:
        first = f"{where}.{layer_keys[0]}"
        implied = ", ".join(writer.put(path, value, first) for path, value in _CARD_TRIGGER.items())
        enabled = table.get("layer_growth_enabled")
        if enabled is not None:
            if not isinstance(enabled, bool):
                raise ValueError(f"config: {where}.layer_growth_enabled = {_show(enabled)}: must be true or false")
            note(f"{where}.layer_growth_enabled = {_show(enabled)} -> "
                 f"{writer.put('growth.enabled', enabled, f'{where}.layer_growth_enabled')}, {implied}")
        else:
            note(f"{where}.layer_growth_* (the card's layer growth) -> {implied}")
    for key in ("layer_growth_threshold", "layer_growth_cooldown", "layer_growth_factor", "max_layers"):
        if key in table:
            card = f"{where}.{key}"
            line = f"{card} = {_show(table[key])} -> {writer.put(CARD_GROWTH_KEYS[key].arbor, table[key], card)}"
            if key == "layer_growth_factor":
                line += ", " + writer.put("growth.step", {"axis": "depth", "num_layers": table[key]}, card)
            note(line)
    if "min_layers" in table:
        card = f"{where}.min_layers"
        line = f"{card} = {_show(table['min_layers'])} -> {writer.put('model.min_layers', table['min_layers'], card)}"
        model = writer.settings.get("model")
        if not (isinstance(model, dict) and "num_hidden_layers" in model):
            line += " (and the starting depth: no layer count is given)"
        note(line)
    if "enabled" in table or "factor" in table:
        shown = ", ".join(f"{where}.{k} = {_show(table[k])}" for k in _MODEL_GROWTH_ONLY if k in table)
        if table.get("enabled") is True:
            note(f"{shown} -> not run (see the warning)")
            result.warnings.append(f"{shown}: {FFN_GROWTH_NOT_RUN}")
        else:
            note(f"{shown} -> nothing to do (the card's FFN growth is off)")


# ------------------------------------------------------------------ errors
#: Names other trainers give arbor's settings, typed at the top level of a config or with ``--set``:
#: the name -> (whose name it is, arbor's setting, what differs). Not accepted as synonyms (a config
#: has one name for each thing): the error names arbor's setting instead of only "unknown setting".
FOREIGN_NAMES: dict[str, tuple[str, str, str]] = {
    **{key: ("Hugging Face", card.arbor, "") for key, card in CARD_TRAINING_KEYS.items() if key != card.arbor},
    "train_batch_size": ("Hugging Face", "batch_size", ""),
    "adam_beta1": ("Hugging Face", "betas", " (betas = [beta1, beta2])"),
    "adam_beta2": ("Hugging Face", "betas", " (betas = [beta1, beta2])"),
    "torch_compile": ("Hugging Face", "compile", ""),
    "warmup_ratio": ("Hugging Face", "warmup_steps", " (a number of steps, not a fraction of the run)"),
    "max_seq_length": ("Hugging Face", "seq_len", ""),
    "dataset_name": ("Hugging Face", "data", ""),
    "tokenizer_name": ("Hugging Face", "tokenizer", ""),
    "max_iters": ("nanoGPT", "max_steps", ""),
    "num_train_steps": ("nanoGPT", "max_steps", ""),
    "lr_decay_iters": ("nanoGPT", "max_steps", " (the cosine decay always spans the whole run)"),
    "block_size": ("nanoGPT", "seq_len", ""),
    "warmup_iters": ("nanoGPT", "warmup_steps", ""),
    "eval_iters": ("nanoGPT", "eval_batches", ""),
    "gradient_accumulation": ("nanoGPT", "grad_accum", ""),
    "beta1": ("nanoGPT", "betas", " (betas = [beta1, beta2])"),
    "beta2": ("nanoGPT", "betas", " (betas = [beta1, beta2])"),
    "min_lr": ("nanoGPT", "min_lr_ratio", " (a fraction of lr, not a learning rate)"),
    "dataset": ("nanoGPT", "data", ""),
    "n_layer": ("nanoGPT", "model.num_hidden_layers", ""),
    "n_embd": ("nanoGPT", "model.hidden_size", ""),
    "n_head": ("nanoGPT", "model.num_attention_heads", ""),
}


def describe_settings_error(exc: ValidationError, model: type[BaseModel] = TrainConfig) -> str:
    """``exc`` (from validating ``model``) in one line: every problem, joined with ``; ``."""
    return "; ".join(settings_problems(exc, model))


def settings_problems(exc: ValidationError, model: type[BaseModel] = TrainConfig) -> list[str]:
    """One ``path: message (got value)`` per error of ``exc``; an unknown key gets the allowed key nearest
    to it, or arbor's name for a Hugging Face or nanoGPT one, and a mistyped value what to write."""
    problems = []
    for error in exc.errors():
        *tables, key = [str(p) for p in error["loc"]] or [""]
        path = ".".join((*tables, key)) or "value"
        if error["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown setting{_unknown_hint(model, tables, key)}")
            continue
        message = error["msg"]
        if "input" in error and error["type"] != "missing":
            message += f" (got {error['input']!r}{_type_hint(error)})"
        problems.append(f"{path}: {message}")
    return problems


def _unknown_hint(model: type[BaseModel], tables: list[str], key: str) -> str:
    if model is TrainConfig and not tables:
        if key in FOREIGN_NAMES:
            whose, arbor, differs = FOREIGN_NAMES[key]
            return f"; `{key}` is the {whose} name, arbor's is `{arbor}`{differs}"
        if key in REFUSED_TRAINING_KEYS:  # Hugging Face's, with no arbor equivalent
            return f"; `{key}` is a Hugging Face setting arbor has no equivalent for: {REFUSED_TRAINING_KEYS[key]}"
        fields = {f for f in _model_fields()} - {"vocab_size"}
        nearest = closest_field(key, fields)
        if nearest is not None and (key in fields or key in KEY_ALIASES):  # a model setting, one level too high
            return f"; did you mean model.{nearest}?"
    hint = closest_field(key, _allowed_keys(model, tables))
    return f"; did you mean {'.'.join((*tables, hint))}?" if hint else ""


def _model_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ArborConfig)]


def _type_hint(error: dict[str, Any]) -> str:
    """What to write instead, for a value of the wrong type whose text reads as the right one."""
    value = error["input"]
    if not isinstance(value, str):
        return ""
    if error["type"] == "bool_type" and value.lower() in ("true", "false"):
        return f": write {value.lower()} without quotes"
    if error["type"] in ("float_type", "int_type") and _number(value) != value:
        # A quoted number is text in every format (arbor's YAML reader takes 2e-5 unquoted as a number).
        return ": write it as a number without quotes"
    return ""


def _allowed_keys(model: type[BaseModel], tables: list[str]) -> list[str]:
    """The keys allowed at ``tables`` (a path into ``model``'s fields), the card's keys there included."""
    for name in tables:
        annotation = model.model_fields[name].annotation if name in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    keys = list(model.model_fields)
    if model is TrainConfig:
        keys.append("training")
    elif tables == ["growth"]:
        keys += [k for k in CARD_GROWTH_KEYS if k not in _MODEL_GROWTH_ONLY]
    return keys
