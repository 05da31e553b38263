"""The ``loss-slope`` trigger: grow when the loss stops following its power law.

Language-model loss falls roughly as a power of the tokens seen,
``L(T) ~ E + A * T**-alpha``. On a log-log plot that is a line of slope
``-alpha`` while the model still has room to learn, bending flat as the loss
approaches what a model of this size can reach. This trigger fits that slope
by least squares over the last stretch of training in log-log space, from
``T / span`` to ``T`` tokens (the last doubling, by default), and grows when
the fitted exponent falls below ``min_slope``.

Unlike a plateau test over a fixed window of steps, the measure does not
depend on how far training has gone: on a clean power law it stays at
``alpha`` forever, while the relative gain over a fixed window shrinks like
``1/T`` and eventually falls below any threshold. And after a growth the fit
starts afresh and needs a full window of post-growth data (``T`` at least
``span`` times the tokens at the growth), so successive growths are at least
a factor ``span`` apart in tokens: a built-in, scale-free cooldown.

Every observation lands in a logarithmic bin holding the sums least squares
needs (count, sum x, sum y, sum x^2, sum xy with x = log T, y = log L), so the
fit is exact over every observed step in the window while the state, and the
checkpoint, stay a few dozen numbers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from arbor_plugins import Decision, Trigger, TriggerState


class LossSlopeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Grow when the fitted exponent alpha of ``loss ~ T**-alpha`` is below this.
    min_slope: float = Field(0.05, gt=0.0)
    #: The fit covers ``[T / span, T]``: 2.0 is the last doubling of the clock.
    span: float = Field(2.0, gt=1.0)
    #: Observations the window must hold before a decision (early fits are noise).
    min_observations: int = Field(50, ge=3)
    #: Logarithmic bins per window: the state's size.
    bins: int = Field(32, ge=4, le=1024)
    #: What T counts: tokens seen, or optimizer steps for loops that do not count tokens.
    clock: Literal["tokens", "steps"] = "tokens"
    #: The growth step to ask for (a GrowthSpec dict); None leaves it to the model's config.
    growth: dict[str, Any] | None = None


def _depth_room(model, growth: dict[str, Any] | None) -> str | None:
    """Why the growth step would exceed ``max_layers``, or None when it fits."""
    spec = growth or getattr(model.config, "growth", None) or {"axis": "depth", "num_layers": 4}
    if spec.get("axis", "depth") != "depth":
        return None
    n, k, limit = model.config.num_hidden_layers, spec.get("num_layers", 4), model.config.max_layers
    if limit is not None and n + k > limit:
        return f"{n} layers + {k} would exceed max_layers={limit}"
    return None


class LossSlopeState(TriggerState):
    def __init__(self, settings: LossSlopeSettings):
        self.settings = settings
        self.width = math.log(settings.span) / settings.bins  # of one bin, in log T
        #: bin index -> [n, sum x, sum y, sum xx, sum xy]
        self.sums: dict[int, list[float]] = {}
        #: Bin of the first observation since the start or the last growth.
        self.first: int | None = None
        self.now: float | None = None  # T of the latest observation

    def _bin(self, t: float) -> int:
        return math.floor(math.log(t) / self.width)

    def observe(self, step, tokens, loss, model) -> None:
        t = float(tokens if self.settings.clock == "tokens" else step)
        if loss is None or not (math.isfinite(loss) and loss > 0) or t <= 0:
            return  # log-log needs positive values; a NaN step says nothing about the trend
        x, y, b = math.log(t), math.log(loss), self._bin(t)
        if self.first is None:
            self.first = b
        s = self.sums.setdefault(b, [0.0] * 5)
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] += v
        self.now = t
        oldest = b - self.settings.bins
        for old in [k for k in self.sums if k < oldest]:  # out of every future window
            del self.sums[old]

    def slope(self) -> tuple[float, int] | None:
        """(alpha, observations) over the current window, or None with too few points."""
        if self.now is None:
            return None
        lo = self._bin(self.now) - self.settings.bins
        n, sx, sy, sxx, sxy = (sum(s[i] for k, s in self.sums.items() if k >= lo) for i in range(5))
        spread = n * sxx - sx * sx
        if n < 2 or spread <= 0:
            return None
        return -(n * sxy - sx * sy) / spread, int(n)

    def decide(self, step, tokens, model) -> Decision:
        s = self.settings
        unit = s.clock
        if self.now is None or self.first is None:
            return Decision(False, "no loss observed yet" if self.now is None else "no loss observed since the growth")
        start = self._bin(self.now) - s.bins
        if self.first > start:
            need = math.exp((self.first + s.bins) * self.width)
            return Decision(False, f"waiting for a full window: the fit spans x{s.span:g} in {unit}, "
                                   f"first judgement near {need:,.0f} {unit}")
        fit = self.slope()
        if fit is None or fit[1] < s.min_observations:
            seen = 0 if fit is None else fit[1]
            return Decision(False, f"waiting for {s.min_observations} observations in the window ({seen} so far)")
        alpha, n = fit
        reason = (f"loss ~ {unit}^{-alpha:+.4f} over {self.now / s.span:,.0f}-{self.now:,.0f} {unit} "
                  f"({n} observations)")
        if alpha >= s.min_slope:
            return Decision(False, f"{reason}; grows below {s.min_slope:g}")
        full = _depth_room(model, s.growth)
        if full:
            return Decision(False, f"{reason}, below {s.min_slope:g}, but {full}")
        return Decision(True, f"{reason}, below {s.min_slope:g}", s.growth)

    def grew(self, step, tokens, model, event) -> None:
        # The grown model starts a new curve: fit only what comes after, over a full window.
        self.sums.clear()
        self.first = None

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [[k, *v] for k, v in sorted(self.sums.items())], "first": self.first, "now": self.now}

    def load_state_dict(self, state) -> None:
        self.sums = {int(row[0]): [float(v) for v in row[1:]] for row in state.get("sums", [])}
        self.first, self.now = state.get("first"), state.get("now")


class LossSlopeTrigger(Trigger):
    description = "grow when the log-log slope of loss against tokens flattens below min_slope (scale-free plateau)"
    Settings = LossSlopeSettings
    #: Settings under which the conformance kit's short loop reaches real decisions: its loop
    #: memorises one batch, whose loss falls steeply, so only a high threshold lets it grow.
    example_settings = {"min_observations": 3, "span": 1.5, "bins": 8, "min_slope": 10.0}

    def start(self, model, settings: LossSlopeSettings) -> LossSlopeState:
        return LossSlopeState(settings)
