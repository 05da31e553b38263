"""Per-layer activation statistics, gathered through ``arbor_pre_forward_stats``.

The model calls the hook before each block on statistics steps only (training
mode, every ``model.stats_interval`` forwards; 0 switches it off, the default).
Each call reduces the block's input to one number per measure, kept **on the
device** in a rolling window, so no step waits for the host; `layer_utilization` moves
them to the host when a trigger asks.

Utilization
-----------
Four measures, named by the ``utilization`` trigger's ``measure`` setting, all
read from the same statistics call (every record holds all four, so a run's
metrics can compare them). ``x`` (``a`` in the card's words) is the block's
input, the residual stream the hook receives: ``n`` tokens (at most
`MAX_TOKENS`) by ``d`` features.

``capacity`` (the trigger's default) is the share of the layer's width that its
input occupies, each direction counted by a saturating function of its variance::

    u = (1 + tau) / d * sum_i l_i / (l_i + tau * mean(l)),    tau = CAPACITY_TOLERANCE = 0.01

for the eigenvalues ``l_i`` of ``C = cov(x)``. A direction with much more than
1 % of an even share of the variance (``mean(l) = tr C / d``) counts as one used
dimension, one with much less as none, one with exactly 1 % as half: a soft rank
at a tolerance of -20 dB. It lies in [0, 1] (1 exactly when the variance is
spread evenly; the factor ``1 + tau`` makes that so) and is invariant to the
activations' scale. Unlike ``participation`` it is not ruled by the few
directions of very large variance a trained residual stream develops: they
count once each and only raise the bar ``tau * mean(l)`` for the others (a
direction holding half of all the variance lowers the measure by about 1 %, one
holding 97 % by about a quarter; the participation ratio falls to about 4/d and
1/d). That is what makes 0.92 reachable. On the stdlib corpus (``tiny`` preset
at four layers, width 64) the inputs of layers 1-3 read 0.99 at initialisation
(random embeddings fill every direction), fall to 0.13-0.27 within the first
100 steps, when the first layer starts writing a few dominant directions, and
climb back to 0.68-0.83 by step 1,000 as the model spreads its features over
its width: the measure follows how much of its width the model uses. It
needs more tokens per statistics forward than the width to read near 1 (``n``
samples span at most ``n - 1`` directions; 2,048 tokens of an evenly spread
input read 0.99 at width 1,024 and 0.92 at 2,000). Computed as ``(1 + tau) / d * (d - k tr((C + kI)^-1))``, ``k = tau mean(l)``, by
a Cholesky factorisation in float64 that never waits for the host.

``participation`` is the participation ratio of the covariance, divided by the
width::

    u = (tr C)^2 / (d * ||C||_F^2)  =  (sum_i l_i)^2 / (d * sum_i l_i^2)

It lies in [1/d, 1]: 1/d when all variance sits in one direction, 1 when it is
spread evenly over all ``d`` dimensions. It is scale-free and cheap (no
factorisation), but the dominant directions of a trained residual stream hold
it far below 1 (0.03-0.25 on the run above), so a 0.92 threshold on it is never
reached; it also reads below 1 on isotropic data when ``n`` is not much larger
than ``d`` (about ``n / (n + d)``).

``card`` is the Arbor-500M-1B card's formula as its card writes it, activation
norm times the fraction of non-zero activations::

    u = mean_t ||x_t||_2  *  #{x != 0} / (n d)

with ``||x_t||_2`` the Euclidean norm of one token's input vector. It is **not
bounded**: it grows with the activations' scale and with the width (a stream of
RMS 1 reads about sqrt(d), 32 at the card's width of 1,024), and in a residual
stream almost no entry is exactly zero, so it is essentially the mean token
norm. A fixed threshold such as 0.92 therefore says "the stream's norm has
passed 0.92", which every layer above the embeddings does early in training.

``arbor`` is the reference implementation's formula, ``min(1, (mean|x| + std x) / 2)``,
kept for comparison with Arbor's published runs. It is a magnitude measure,
not a utilization: it grows with the scale of the activations, so a fixed
threshold means different things as training changes weight norms.
"""

from __future__ import annotations

from collections import deque

import torch

MEASURES = ("participation", "arbor", "card", "capacity")
#: Tokens per statistics call at most: the covariance costs tokens x d^2.
MAX_TOKENS = 2048
#: ``capacity``: the share of an even split of the variance at which a direction counts as half used.
CAPACITY_TOLERANCE = 0.01


def _capacity(cov: torch.Tensor) -> torch.Tensor:
    """The ``capacity`` measure of a covariance matrix (see the module docs), without a host sync."""
    d = cov.shape[0]
    # The smallest directions decide the trace of the inverse: float32 is too coarse (MPS has no float64).
    c = cov.to(torch.float32 if cov.device.type == "mps" else torch.float64)
    k = CAPACITY_TOLERANCE * c.diagonal().sum() / d
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    factor, _ = torch.linalg.cholesky_ex(c + k.clamp(min=1e-30) * eye)  # _ex: no error check, no sync
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)  # L^-1; tr((C + kI)^-1) = ||L^-1||_F^2
    used = d - k * inverse.square().sum()
    return ((1 + CAPACITY_TOLERANCE) * used / d).clamp(0.0, 1.0).float()


class LayerStats:
    """Rolling per-layer measurements of one model."""

    def __init__(self, history: int = 10):
        self.history = history
        self.records: dict[int, deque[torch.Tensor]] = {}

    def add(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        with torch.no_grad():
            x = hidden_states.detach().reshape(-1, hidden_states.shape[-1])
            if x.shape[0] > MAX_TOKENS:  # an even subsample bounds the cost on long batches
                x = x[:: -(-x.shape[0] // MAX_TOKENS)]
            x = x.float()
            centered = x - x.mean(0)
            cov = centered.T @ centered / max(1, x.shape[0] - 1)
            trace = cov.diagonal().sum()
            participation = trace.square() / (cov.square().sum() * x.shape[1]).clamp(min=1e-30)
            arbor = ((x.abs().mean() + x.std()) / 2).clamp(max=1.0)
            card = x.norm(dim=-1).mean() * (x != 0).float().mean()
            record = torch.stack([participation, arbor, card, _capacity(cov)])  # in the order of MEASURES
        self.records.setdefault(layer_idx, deque(maxlen=self.history)).append(record)

    def utilization(self, measure: str = "participation", min_records: int = 1) -> list[float] | None:
        """Mean over the window, per layer in order; None until every layer has ``min_records``."""
        if not self.records:
            return None
        n = max(self.records) + 1
        if any(len(self.records.get(i, ())) < min_records for i in range(n)):
            return None
        column = MEASURES.index(measure)
        return [row[column] for row in self._means(n)]

    def utilizations(self) -> dict[str, list[float]] | None:
        """Every measure's mean over the window, per layer in order; None until every layer has a record."""
        if not self.records or any(not self.records.get(i) for i in range(max(self.records) + 1)):
            return None
        means = self._means(max(self.records) + 1)
        return {name: [row[column] for row in means] for column, name in enumerate(MEASURES)}

    def _means(self, n: int) -> list[list[float]]:
        means = torch.stack([torch.stack(list(self.records[i])).mean(0) for i in range(n)])
        return means.cpu().tolist()  # the one host sync, when a trigger asks

    def reset(self) -> None:
        self.records.clear()


def layer_stats(model, history: int | None = None) -> LayerStats:
    """The `LayerStats` of ``model`` (created on first use)."""
    model = _inner(model)
    stats = getattr(model, "_arbor_layer_stats", None)
    if stats is None:
        stats = LayerStats(history or 10)
        object.__setattr__(model, "_arbor_layer_stats", stats)  # plain attribute, not a submodule
    elif history is not None and history != stats.history:
        stats.history = history
        stats.records = {i: deque(r, maxlen=history) for i, r in stats.records.items()}
    return stats


def stats_state(model) -> dict | None:
    """The rolling window and the forward count of ``model``'s statistics, for a checkpoint (None: none yet).

    A resumed run needs both to sample the same forwards and fill the same
    window as the run that never stopped (`load_stats_state`).
    """
    decoder = _inner(model)
    stats = getattr(decoder, "_arbor_layer_stats", None)
    step = int(getattr(decoder, "stats_step", 0))
    if stats is None and not step:
        return None
    records = {} if stats is None else {str(i): torch.stack(list(r)).cpu() for i, r in stats.records.items() if r}
    return {"stats_step": step, "history": None if stats is None else stats.history, "records": records}


def load_stats_state(model, state: dict | None) -> None:
    """Put back what `stats_state` saved."""
    if not state:
        return
    decoder = _inner(model)
    decoder.stats_step = int(state["stats_step"])
    if state.get("history") is not None:
        stats = layer_stats(model, int(state["history"]))
        device = next(decoder.parameters()).device
        # A window saved with other measures (an older arbor) is left out: it refills within `history` calls.
        stats.records = {int(i): deque(list(t.to(device)), maxlen=stats.history) for i, t in state["records"].items()
                         if t.shape[-1] == len(MEASURES)}


def layer_utilization(model, measure: str = "participation", min_records: int = 1) -> list[float] | None:
    """Per-layer utilization of ``model`` over the rolling window (see the module docs)."""
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is invalid: must be one of {', '.join(MEASURES)}")
    return layer_stats(model).utilization(measure, min_records)


def _inner(model):
    """Statistics live on the decoder stack, which is what the hook sees; accept the causal LM too."""
    return model.model if hasattr(model, "lm_head") else model
