"""Stages of a growing run: which parts train from the start, and after each growth step.

A run's ``growth.stages`` lists its stages in order. The first (stage A) holds from the start of
the run; stage k+1 begins with growth step k (counting from 1), and the last stage also holds for
any later growth step. Each stage may name:

* ``freeze_policy`` / ``freeze_settings``: the freeze policy the growth step that begins the stage
  applies (``freeze-below``, ``lora-below``, ...), in place of the run's one ``growth.freeze_policy``;
  the first stage begins with no growth step, so it takes none;
* ``train``: selectors (`arbor.growth.freezing`) unfrozen when the stage begins;
* ``freeze``: selectors frozen when the stage begins, after ``train``: a parameter both name is
  frozen. With tied embeddings the LM head *is* the embedding matrix, so ``freeze = ["embeddings"]``
  freezes the head too, whatever ``train`` says;
* ``lr_scale``: the whole model's learning rate in this stage, as a multiple of the run's schedule
  (default 1). A small model may want a lower peak rate than the grown one: stages of 1, 1.41 and
  2 let a 2 -> 4 -> 6-layer run start at half the rate it ends on;
* ``name``: how the log calls it (default A, B, C, ...).

A stage begins with one ``"event": "stage"`` record in ``metrics.jsonl`` and one console line saying
what trains and what is frozen (`trainable_parts`). The stage a run is in is the number of growth
steps it has taken, which every checkpoint holds (its growth history), and the parameters' frozen
state is saved with it, so a resumed run goes on in its stage and begins the next one as the
uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from arbor.growth.freezing import FreezeError, parse_selector

__all__ = ["StageSettings", "apply_stage_selectors", "check_stages", "describe_stage", "stage_label",
           "trainable_parts"]

#: Layer count the selectors are checked against in the settings: only the grammar is checked there;
#: "layers:7" on a model that has fewer layers when the stage begins is an error then.
_ANY_DEPTH = 1 << 20


class StageSettings(BaseModel):
    """One stage of ``growth.stages``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = None
    freeze_policy: str | None = None
    freeze_settings: dict[str, Any] = Field(default_factory=dict)
    train: list[str] = Field(default_factory=list)
    freeze: list[str] = Field(default_factory=list)
    lr_scale: float = Field(1.0, gt=0)

    @field_validator("train", "freeze")
    @classmethod
    def _selectors(cls, selectors: list[str]) -> list[str]:
        for selector in selectors:
            try:
                parse_selector(selector, _ANY_DEPTH)
            except FreezeError as exc:
                raise PydanticCustomError("selector", str(exc)) from None
        return selectors

    @model_validator(mode="after")
    def _settings_need_a_policy(self):
        if self.freeze_settings and self.freeze_policy is None:
            raise PydanticCustomError("settings", "freeze_settings are given but no freeze_policy to take them")
        return self


def check_stages(stages: list[StageSettings], freeze_policy: str | None, freeze_settings: dict) -> None:
    """The rules between the stages and the rest of ``growth`` (a validator of ``growth.stages``)."""
    if not stages:
        raise PydanticCustomError("stages", "is empty: list one table per stage (the first from the start of "
                                            "the run), or leave growth.stages out")
    if freeze_policy is not None or freeze_settings:
        raise PydanticCustomError("stages", "cannot be used with growth.freeze_policy / growth.freeze_settings: "
                                            "give each stage its own freeze_policy")
    if stages[0].freeze_policy is not None:
        raise PydanticCustomError(
            "stages", f"the first stage has freeze_policy={stages[0].freeze_policy!r}, but it begins before any "
                      "growth step and a freeze policy acts on one; give the first stage train / freeze selectors")
    names = [stage_label(stages, k) for k in range(len(stages))]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PydanticCustomError("stages", f"the name {twice[0]!r} is given to more than one stage")


def stage_label(stages: list[StageSettings], index: int) -> str:
    """The stage's name, else A, B, C, ... (then 27, 28, ...)."""
    name = stages[index].name
    if name:
        return name
    return chr(ord("A") + index) if index < 26 else str(index + 1)


def apply_stage_selectors(model, stage: StageSettings, optimizer=None) -> tuple[list[str], list[str]]:
    """Unfreeze ``stage.train``, then freeze ``stage.freeze``; returns the names unfrozen and frozen now."""
    trained = model.unfreeze(*stage.train, optimizer=optimizer) if stage.train else []
    frozen = model.freeze(*stage.freeze, optimizer=optimizer) if stage.freeze else []
    return trained, frozen


def _ranges(indices: list[int]) -> str:
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ",".join(out)


def trainable_parts(model) -> dict[str, Any]:
    """Which parts of ``model`` train: ``{"trainable": [...], "frozen": [...], "partial": [...]}``.

    Parts are ``embeddings``, ``layers:A-B`` (runs of layers in the same state), ``norm`` (the final
    norm) and ``lm_head``; a part is partial when only some of its parameters train (LoRA adapters
    on a frozen layer). A frozen substrate's embeddings (a buffer) are frozen. ``tied`` says whether
    the head is the embedding matrix; the counts are of parameter elements.
    """

    def state(module) -> str:
        flags = [p.requires_grad for p in module.parameters()]
        if not flags or not any(flags):
            return "frozen"
        return "trainable" if all(flags) else "partial"

    parts: dict[str, list[str]] = {"trainable": [], "frozen": [], "partial": []}
    parts[state(model.model.embed_tokens)].append("embeddings")
    layers: dict[str, list[int]] = {"trainable": [], "frozen": [], "partial": []}
    for i, layer in enumerate(model.model.layers):
        layers[state(layer)].append(i)
    for key, indices in layers.items():
        if indices:
            parts[key].append(f"layers:{_ranges(indices)}")
    parts[state(model.model.norm)].append("norm")
    parts[state(model.lm_head)].append("lm_head")
    seen: dict[int, Any] = {id(p): p for p in model.parameters()}  # a tied tensor once
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    tied = model.lm_head.weight is getattr(model.model.embed_tokens, "weight", None)
    return {**parts, "tied": tied, "trainable_params": trainable,
            "frozen_params": sum(p.numel() for p in seen.values()) - trainable}


def describe_stage(record: dict[str, Any]) -> str:
    """The console line for a stage record."""
    line = (f"stage {record['name']} ({record['stage'] + 1}/{record['stages']}): trains "
            f"{', '.join(record['trainable']) or 'nothing'}")
    if record["partial"]:
        line += f"; partly (adapters): {', '.join(record['partial'])}"
    line += f"; frozen: {', '.join(record['frozen']) or 'nothing'}"
    if record["tied"] and "embeddings" in record["frozen"]:
        line += " (the LM head is the tied embedding matrix)"
    line += f"; {record['trainable_params']:,} trainable parameters"
    if record.get("lr_scale", 1.0) != 1.0:
        line += f"; learning rate x{record['lr_scale']:g}"
    return line if record.get("step") is None else f"step {record['step']}: {line}"
