"""Per-layer activation statistics, gathered through ``arbor_pre_forward_stats``.

The model calls the hook before each block on statistics steps only (training
mode, every ``model.stats_interval`` forwards; 0 switches it off, the default).
Each call reduces the block's input to two numbers kept **on the device**, in
a rolling window, so no step waits for the host; `layer_utilization` moves
them to the host when a trigger asks.

Utilization
-----------
``participation`` (the default) is the participation ratio of the layer
input's covariance, divided by the width::

    u = (tr C)^2 / (d * ||C||_F^2)  =  (sum_i l_i)^2 / (d * sum_i l_i^2)

for the eigenvalues ``l_i`` of ``C = cov(x)``. It lies in [1/d, 1]: 1/d when
all variance sits in one direction, 1 when it is spread evenly over all ``d``
dimensions. It reads as "the fraction of the residual stream's dimensions the
layer's input really uses"; when most layers use nearly all of theirs, the
model has little room left at this width, which is the situation Arbor's rule
grows on. It is invariant to the activations' scale, so it does not drift with
weight norms, and needs no eigen-decomposition (``||C||_F^2`` is one matmul).

``arbor`` is the reference implementation's formula, ``min(1, (mean|a| + std a) / 2)``,
kept for comparison with Arbor's published runs. It is a magnitude measure,
not a utilization: it grows with the scale of the activations, so a fixed
threshold means different things as training changes weight norms.
"""

from __future__ import annotations

from collections import deque

import torch

MEASURES = ("participation", "arbor")
#: Tokens per statistics call at most: the covariance costs tokens x d^2.
MAX_TOKENS = 2048


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
            record = torch.stack([participation, arbor])
        self.records.setdefault(layer_idx, deque(maxlen=self.history)).append(record)

    def utilization(self, measure: str = "participation", min_records: int = 1) -> list[float] | None:
        """Mean over the window, per layer in order; None until every layer has ``min_records``."""
        if not self.records:
            return None
        n = max(self.records) + 1
        if any(len(self.records.get(i, ())) < min_records for i in range(n)):
            return None
        column = MEASURES.index(measure)
        means = torch.stack([torch.stack(list(self.records[i])).mean(0)[column] for i in range(n)])
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
        stats.records = {int(i): deque(list(t.to(device)), maxlen=stats.history) for i, t in state["records"].items()}


def layer_utilization(model, measure: str = "participation", min_records: int = 1) -> list[float] | None:
    """Per-layer utilization of ``model`` over the rolling window (see the module docs)."""
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is invalid: must be one of {', '.join(MEASURES)}")
    return layer_stats(model).utilization(measure, min_records)


def _inner(model):
    """Statistics live on the decoder stack, which is what the hook sees; accept the causal LM too."""
    return model.model if hasattr(model, "lm_head") else model
