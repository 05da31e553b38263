"""Built-in triggers: when to grow.

Each trigger is a factory (`arbor_plugins.Trigger`); ``start(model, settings)``
returns the per-run state that observes training and decides. A decision says
why, in words that go into the log, and may name the growth step to take.

=================  ==================================================================
name               grows when
=================  ==================================================================
utilization        at least ``fraction`` of the layers have utilization above
                   ``threshold`` (Arbor: 80 % over 0.92), after a cooldown; +4 layers.
                   ``measure``: capacity (default), participation, card, arbor
                   (`arbor_strategies.stats`)
loss-plateau       the smoothed loss improved by less than ``epsilon`` (relative) over
                   the last ``window`` steps
schedule           the step (or token count) reaches the next entry of a list
compute-optimal    the tokens seen since the last growth reach ``tokens_per_parameter``
                   times the model's current parameter count
=================  ==================================================================
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from pydantic import Field, model_validator

from arbor_plugins import Decision, StrictSettings, Trigger, TriggerState
from arbor_strategies.stats import MEASURES, layer_stats


def _depth_room(model, num_layers: int, max_layers: int | None) -> str | None:
    """Why ``num_layers`` more layers do not fit, or None when they do."""
    n = model.config.num_hidden_layers
    limit = max_layers if max_layers is not None else model.config.max_layers
    if limit is not None and n + num_layers > limit:
        return f"{n} layers + {num_layers} would exceed max_layers={limit}"
    return None


# ---------------------------------------------------------------- utilization
class UtilizationSettings(StrictSettings):
    threshold: float = Field(0.92, gt=0.0, le=1.0)
    fraction: float = Field(0.8, gt=0.0, le=1.0)
    cooldown: int = Field(5000, ge=0)
    num_layers: int = Field(4, ge=1)
    #: Depth limit; None takes the config's ``max_layers`` (Arbor: 24 -> 64 layers, with
    #: ``min_layers`` = 24 in the config as the starting depth).
    max_layers: int | None = Field(None, ge=1)
    #: Which utilization (`arbor_strategies.stats`): "capacity" (share of the width in use, in [0, 1]),
    #: "participation", "card" (the Arbor card's formula, not bounded) or "arbor" (its reference code's).
    measure: str = "capacity"
    #: Statistics are taken every this many training forwards (sets ``model.stats_interval``).
    stats_interval: int = Field(100, ge=1)
    #: Measurements per layer kept in the rolling window, and needed before a decision.
    history: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}")
        return self


class UtilizationState(TriggerState):
    def __init__(self, model, settings: UtilizationSettings):
        if model.config.num_hidden_layers == 0:  # no layer to measure: it would wait forever without a word
            raise ValueError("trigger 'utilization' measures layers, but the model has num_hidden_layers=0; "
                             "start with a layer, or grow from none with 'schedule', 'loss-plateau' or 'compute-optimal'")
        self.settings = settings
        self.last_growth: int | None = None
        model.stats_interval = settings.stats_interval
        layer_stats(model, settings.history)

    def decide(self, step, tokens, model) -> Decision:
        s = self.settings
        if self.last_growth is not None and step - self.last_growth < s.cooldown:
            return Decision(False, f"cooldown: {s.cooldown - (step - self.last_growth)} steps left")
        full = _depth_room(model, s.num_layers, s.max_layers)
        if full:
            return Decision(False, full)
        util = layer_stats(model).utilization(s.measure, min_records=s.history)
        if util is None:
            return Decision(False, f"waiting for {s.history} statistics per layer")
        high = sum(u > s.threshold for u in util)
        share = high / len(util)
        # The figures the decision rests on, so a growth record says why it grew.
        summary = (f"{high}/{len(util)} layers above {s.threshold:g} {s.measure} utilization "
                   f"({share:.0%} {'>=' if share >= s.fraction else '<'} {s.fraction:.0%}; per layer "
                   f"min {min(util):.3f}, mean {sum(util) / len(util):.3f}, max {max(util):.3f} "
                   f"over the last {s.history} statistics)")
        if share >= s.fraction:
            return Decision(True, summary, {"axis": "depth", "num_layers": s.num_layers})
        return Decision(False, summary)

    def report(self, step, tokens, model) -> dict[str, Any]:
        """Per-layer utilization over the window for the training record: the trigger's measure as
        ``utilization`` (with its threshold and fraction, which `arbor plot` draws), every measure in
        ``utilization_measures``. Nothing until every layer has a statistic."""
        every = layer_stats(model).utilizations()
        if every is None:
            return {}
        s = self.settings
        rounded = {name: [float(f"{u:.4g}") for u in values] for name, values in every.items()}
        return {"utilization": rounded[s.measure], "utilization_measure": s.measure,
                "utilization_threshold": s.threshold, "utilization_fraction": s.fraction,
                "utilization_measures": rounded}

    def grew(self, step, tokens, model, event) -> None:
        self.last_growth = step
        layer_stats(model).reset()  # layers moved and the stream changed: measure afresh

    def state_dict(self) -> dict[str, Any]:
        return {"last_growth": self.last_growth}

    def load_state_dict(self, state) -> None:
        self.last_growth = state.get("last_growth")


class UtilizationTrigger(Trigger):
    description = "grow when most layers' activation utilization stays high (Arbor's rule: 80% over 0.92, +4 layers)"
    Settings = UtilizationSettings

    def start(self, model, settings) -> UtilizationState:
        return UtilizationState(model, settings)


# --------------------------------------------------------------- loss plateau
class PlateauSettings(StrictSettings):
    #: Steps over which the improvement is measured.
    window: int = Field(200, ge=2)
    #: Relative improvement of the smoothed loss below which training has plateaued.
    epsilon: float = Field(0.01, gt=0.0)
    #: Smoothing of the loss (exponential moving average factor).
    beta: float = Field(0.9, ge=0.0, lt=1.0)
    #: Steps after a growth before the plateau is judged again (defaults to one window).
    cooldown: int | None = Field(None, ge=0)


class PlateauState(TriggerState):
    def __init__(self, settings: PlateauSettings):
        self.settings = settings
        self.ema: float | None = None
        self.history: deque[float] = deque(maxlen=settings.window + 1)
        self.last_growth: int | None = None

    def observe(self, step, tokens, loss, model) -> None:
        if loss is None or not math.isfinite(loss):
            return
        b = self.settings.beta
        self.ema = loss if self.ema is None else b * self.ema + (1 - b) * loss
        self.history.append(self.ema)

    def decide(self, step, tokens, model) -> Decision:
        s = self.settings
        cooldown = s.window if s.cooldown is None else s.cooldown
        if self.last_growth is not None and step - self.last_growth < cooldown:
            return Decision(False, f"cooldown: {cooldown - (step - self.last_growth)} steps left")
        if len(self.history) <= s.window:
            return Decision(False, f"waiting for {s.window + 1} losses ({len(self.history)} so far)")
        before, now = self.history[0], self.history[-1]
        gain = (before - now) / max(abs(before), 1e-12)
        reason = f"smoothed loss {before:.4f} -> {now:.4f} over {s.window} steps ({gain:+.2%})"
        return Decision(gain < s.epsilon, reason + (f" < {s.epsilon:.2%}" if gain < s.epsilon else ""))

    def grew(self, step, tokens, model, event) -> None:
        self.last_growth = step
        self.history.clear()  # a fresh window: the loss right after growth is not a plateau

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "history": list(self.history), "last_growth": self.last_growth}

    def load_state_dict(self, state) -> None:
        self.ema, self.last_growth = state.get("ema"), state.get("last_growth")
        self.history = deque(state.get("history", []), maxlen=self.settings.window + 1)


class PlateauTrigger(Trigger):
    description = "grow when the smoothed loss improves by less than epsilon over a window of steps"
    Settings = PlateauSettings

    def start(self, model, settings) -> PlateauState:
        return PlateauState(settings)


# ------------------------------------------------------------------- schedule
class ScheduleSettings(StrictSettings):
    #: Grow when the optimizer step reaches each of these (ascending).
    steps: list[int] | None = None
    #: Or when the tokens seen reach each of these (ascending).
    tokens: list[int] | None = None
    #: The growth step for each entry (a GrowthSpec dict); one dict applies to all; None: the config's.
    growth: list[dict[str, Any]] | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        marks = self.steps if self.steps is not None else self.tokens
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        if any(b <= a for a, b in zip(marks, marks[1:])) or any(m < 0 for m in marks):
            raise ValueError("the schedule must be non-negative and strictly ascending")
        if isinstance(self.growth, list) and len(self.growth) != len(marks):
            raise ValueError(f"growth lists {len(self.growth)} steps for {len(marks)} schedule entries")
        return self


class ScheduleState(TriggerState):
    def __init__(self, settings: ScheduleSettings):
        self.settings = settings
        self.done = 0

    def decide(self, step, tokens, model) -> Decision:
        s = self.settings
        marks, unit, now = (s.steps, "step", step) if s.steps is not None else (s.tokens, "tokens", tokens)
        if self.done >= len(marks):
            return Decision(False, "schedule finished")
        mark = marks[self.done]
        if now < mark:
            return Decision(False, f"next growth at {unit} {mark}")
        growth = s.growth[self.done] if isinstance(s.growth, list) else s.growth
        return Decision(True, f"scheduled growth {self.done + 1}/{len(marks)} at {unit} {mark}", growth)

    def grew(self, step, tokens, model, event) -> None:
        self.done += 1

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state) -> None:
        self.done = int(state.get("done", 0))


class ScheduleTrigger(Trigger):
    description = "grow at given steps or token counts (PGT stages: 3 -> 6 -> 9 layers)"
    Settings = ScheduleSettings

    def start(self, model, settings) -> ScheduleState:
        return ScheduleState(settings)


# ------------------------------------------------------------ compute-optimal
class ComputeSettings(StrictSettings):
    #: Tokens to train on per parameter of the current model before growing it.
    tokens_per_parameter: float = Field(20.0, gt=0.0)
    #: Count embedding (and untied head) parameters too; off by default, as in scaling-law counts.
    count_embeddings: bool = False


def _parameters(model, count_embeddings: bool) -> int:
    total = sum(p.numel() for p in model.parameters())
    if count_embeddings:
        return total
    embed = model.model.embed_tokens
    skip = sum(p.numel() for p in embed.parameters())
    if model.lm_head.weight is not getattr(embed, "weight", None):
        skip += model.lm_head.weight.numel()
    return total - skip


class ComputeState(TriggerState):
    def __init__(self, settings: ComputeSettings):
        self.settings = settings
        self.since = 0  # tokens at the last growth

    def decide(self, step, tokens, model) -> Decision:
        s = self.settings
        n = _parameters(model, s.count_embeddings)
        budget = s.tokens_per_parameter * n
        seen = tokens - self.since
        reason = f"{seen:,} tokens since the last growth, budget {budget:,.0f} ({s.tokens_per_parameter:g} x {n:,} params)"
        return Decision(seen >= budget, reason)

    def grew(self, step, tokens, model, event) -> None:
        self.since = tokens

    def state_dict(self) -> dict[str, Any]:
        return {"since": self.since}

    def load_state_dict(self, state) -> None:
        self.since = int(state.get("since", 0))


class ComputeOptimalTrigger(Trigger):
    description = "grow once the tokens seen since the last growth reach tokens_per_parameter x the model's size"
    Settings = ComputeSettings

    def start(self, model, settings) -> ComputeState:
        return ComputeState(settings)


TRIGGERS = {
    "utilization": UtilizationTrigger(),
    "loss-plateau": PlateauTrigger(),
    "schedule": ScheduleTrigger(),
    "compute-optimal": ComputeOptimalTrigger(),
}
