"""The settings of a training run: `TrainConfig` (what ``arbor train`` reads from a TOML or YAML
file and ``--set``), its `GrowthSettings`, the learning-rate schedule `lr_factor`, and the growth a
run takes when nothing names one (`DEFAULT_GROWTH`, `trigger_choice`).

Pure data and functions: the `Trainer` (`arbor.training.trainer`) runs them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from arbor.training.stages import StageSettings, check_stages
from arbor_plugins import DEFAULTS


class _Strict(BaseModel):
    # An infinite or NaN setting (lr=Infinity) would train garbage without an error. Strict types: pydantic's
    # lax mode reads max_steps = true as 1 and "false" as False, so a quoted or mistyped value would train
    # something else than was meant; an int for a float stays accepted (TOML, YAML and JSON write 1 for 1.0).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


#: One of AdamW's betas, a decay rate in [0, 1): at 1 Adam's bias correction 1 - beta**t divides by zero.
_Beta = Annotated[float, Field(strict=True, ge=0, lt=1)]


class GrowthSettings(_Strict):
    """How the run grows. Roles left as None fall back to ``plugins.toml``, then to the defaults."""

    #: False: the run never grows; no trigger is started, so none collects statistics or is asked.
    enabled: bool = True
    #: Trigger name and settings; default: "schedule" with DEFAULT_GROWTH (10 % and 30 % of ``max_steps``).
    trigger: str | None = None
    trigger_settings: dict[str, Any] = Field(default_factory=dict)
    #: The step ``model.grow()`` takes when the trigger names none (a GrowthSpec dict).
    step: dict[str, Any] | None = None
    init: str | None = None
    insertion_policy: str | None = None
    freeze_policy: str | None = None
    freeze_settings: dict[str, Any] = Field(default_factory=dict)
    #: What trains in each stage (`arbor.training.stages`): the first entry from the start of the run,
    #: entry k from the k-th growth step on (the last for any later step); each names its freeze policy,
    #: in place of ``freeze_policy``, and train / freeze selectors.
    stages: list[StageSettings] | None = None
    new_param_lr_multiplier: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    #: Steps over which the whole model's learning rate climbs back from 1/rewarm_steps of the schedule's
    #: to all of it after each growth step (0: off); ``warmup_steps`` ramps only the new parameters.
    rewarm_steps: int = Field(0, ge=0)
    #: What a step whose init claims exactness but moves the probe loss by more than
    #: ``exact_tolerance`` (relative) does: "warn" logs it as not exact, "error" stops the run.
    exactness: Literal["warn", "error"] = "warn"
    exact_tolerance: float = Field(1e-4, gt=0)

    @field_validator("stages", mode="before")
    @classmethod
    def _strict_stage_numbers(cls, stages):
        # StageSettings reads lax types; a stage's lr_scale = true or "0.5" is refused here as elsewhere.
        for k, stage in enumerate(stages if isinstance(stages, list) else []):
            scale = stage.get("lr_scale") if isinstance(stage, dict) else None
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
                raise PydanticCustomError("strict_type", "stage {k}: lr_scale={scale} must be a number, not a {kind}",
                                          {"k": k, "scale": repr(scale), "kind": type(scale).__name__})
        return stages

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, stages, info: ValidationInfo):
        if stages is not None:
            check_stages(stages, info.data.get("freeze_policy"), info.data.get("freeze_settings"))
        return stages


class TrainConfig(_Strict):
    """Everything ``arbor train`` needs; a TOML/YAML file and ``--set`` fill it."""

    #: The default starts at 2 of the ``small`` preset's 6 layers and grows into it (DEFAULT_GROWTH).
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "small", "num_hidden_layers": 2})
    data: str = "stdlib"
    #: "auto": the substrate's own tokenizer if it has one (unicode-glyphs: code points), else "bpe";
    #: "bpe": train a byte-level BPE on the training split; else a tokenizer path.
    tokenizer: str = "auto"
    #: Read special-token text in the data (``<|eos|>``) as those tokens; by default it is plain text.
    parse_special_tokens: bool = False
    vocab_size: int = Field(2048, ge=64)
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    #: JSON, TOML and YAML give a list; each entry is strict and in [0, 1).
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.95), strict=False)
    grad_clip: float = Field(1.0, ge=0)
    max_steps: int = Field(1000, ge=1)
    bf16: bool = False
    gradient_checkpointing: bool = False
    #: Train through ``torch.compile`` (`arbor.model.modeling.CompiledForward`; statistics as in an eager
    #: run); the compiled graphs are dropped after each growth step and rebuilt on the next step.
    compile: bool = False
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(16, ge=1)
    log_interval: int = Field(10, ge=1)
    save_interval: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    seed: int = 0
    growth: GrowthSettings = Field(default_factory=GrowthSettings)
    sample_prompt: str = "The"
    sample_tokens: int = Field(40, ge=0)
    device: str = "cpu"
    #: A step whose loss or gradient norm is not finite: "stop" the run before the update (the
    #: weights and the last checkpoint stay as they were), or "skip" the update and go on.
    on_nonfinite: Literal["stop", "skip"] = "stop"


def lr_factor(step: int, config: TrainConfig, last_growth: int | None = None) -> float:
    """Warm-up then cosine decay to ``min_lr_ratio``, as a multiple of ``config.lr``; with
    ``growth.rewarm_steps`` and a growth step after ``last_growth`` steps, that times a linear ramp
    over the ``rewarm_steps`` steps that follow it."""
    rewarm = config.growth.rewarm_steps
    ramp = min(1.0, (step - last_growth + 1) / rewarm) if rewarm and last_growth is not None else 1.0
    if step < config.warmup_steps:
        return ramp * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return ramp * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


#: What a run grows when nothing names a trigger: (fraction of ``max_steps``, growth step). Two
#: layers at the middle at 10 % and again at 30 % of the run (zero init, exact), 2 -> 4 -> 6 layers:
#: `depth` in benches/efficiency.py, which reaches scratch's loss with 0.95x its FLOPs at the standard
#: size when both warm up over 30 % of the run (docs/benchmarks.md).
DEFAULT_GROWTH: tuple[tuple[float, dict[str, Any]], ...] = (
    (0.1, {"axis": "depth", "num_layers": 2}),
    (0.3, {"axis": "depth", "num_layers": 2}),
)


def trigger_choice(config: TrainConfig, selection=None) -> tuple[str | None, dict[str, Any]]:
    """The trigger a run uses and its settings, defaults filled in (None: plugins.toml's)."""
    g = config.growth
    name, settings = g.trigger, dict(g.trigger_settings)
    if name is None and not (selection is not None and selection.name("trigger")):
        name = DEFAULTS["trigger"]  # the schedule trigger: DEFAULT_GROWTH, unless the config names the step
        if g.step is None:
            settings.setdefault("growth", [dict(step) for _, step in DEFAULT_GROWTH])
    if name == "schedule" and "steps" not in settings and "tokens" not in settings:
        settings["steps"] = default_marks(config.max_steps)  # a schedule without marks: DEFAULT_GROWTH's
    return name, settings


def default_marks(max_steps: int) -> list[int]:
    """The steps at which `DEFAULT_GROWTH` grows a run of ``max_steps``: its fractions, strictly ascending."""
    marks: list[int] = []
    for fraction, _ in DEFAULT_GROWTH:
        marks.append(max(round(fraction * max_steps), marks[-1] + 1 if marks else 1))
    return marks
