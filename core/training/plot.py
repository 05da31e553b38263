"""``arbor plot RUN_DIR``: a training run at a glance, from its ``metrics.jsonl``.

Panels share the x axis (tokens seen): the training loss (and validation
loss) with every growth event marked, and the parameter count over time. When
the records carry per-layer utilization (the ``utilization`` trigger reports
it at every log interval), two more: a heat map of each layer's utilization
over the run, and the share of layers above the trigger's threshold against
the fraction that makes it grow.
Uses matplotlib (a dependency of arbor) without a display (the Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path

from arbor.training.textfiles import log_lines


class PlotError(ValueError):
    """The run directory has nothing to plot (one-line message)."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file; give the --out directory of an 'arbor train' run")
    records = []
    # Only the last line may be cut short by a crash (inside a character too: `log_lines` drops it then).
    for number, line, last in log_lines(path, error=PlotError):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not last:
                raise PlotError(f"{path}:{number}: not valid JSON") from None
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's plot (default ``RUN_DIR/training.png``) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r and "event" not in r]
    val = [r for r in records if "val_loss" in r]
    events = [r for r in records if r.get("event") == "growth"]
    if not train:
        raise PlotError(f"{Path(run_dir) / 'metrics.jsonl'} has no training records yet")
    utilization = [r for r in train if isinstance(r.get("utilization"), list) and r["utilization"]]
    rows = (2, 1) + ((2, 1) if utilization else ())
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 10 if utilization else 6), sharex=True, height_ratios=rows,
                             squeeze=False)
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        top.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", ms=3)
    for e in events:
        for ax in axes[:, 0]:
            ax.axvline(e["tokens"], color="tab:red", ls="--", lw=0.8, alpha=0.7)
        label = f"{e['axis']} ({e.get('init', '?')})"
        top.annotate(label, (e["tokens"], 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                     ha="right", fontsize=7, color="tab:red")
    top.set_ylabel("loss")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"{Path(run_dir).name}: {len(events)} growth event(s)")
    # Growth events carry the size before and after, so the jumps sit exactly at the event.
    points = [(r["tokens"], 0, r["params"]) for r in train] + \
        [(e["tokens"], -1, e["params_before"]) for e in events if "params_before" in e] + \
        [(e["tokens"], 1, e["params"]) for e in events if "params" in e]
    points.sort()
    bottom.step([t for t, _, _ in points], [n / 1e6 for _, _, n in points], where="post")
    bottom.set_ylabel("parameters (M)")
    if utilization:
        _plot_utilization(fig, axes[2, 0], axes[3, 0], utilization)
    axes[-1, 0].set_xlabel("tokens seen")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "training.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_utilization(fig, heat, share, records: list[dict]) -> None:
    """Per-layer utilization as a heat map (layer index up, tokens across; blank where a layer did not
    exist yet), and below it the share of layers above the threshold with the fraction that grows."""
    import numpy as np

    measure = records[-1].get("utilization_measure", "")
    threshold, fraction = records[-1].get("utilization_threshold"), records[-1].get("utilization_fraction")
    depth = max(len(r["utilization"]) for r in records)
    values = np.full((depth, len(records)), np.nan)
    for column, r in enumerate(records):
        values[: len(r["utilization"]), column] = r["utilization"]
    tokens = np.array([r["tokens"] for r in records], dtype=float)
    # Each record covers the tokens since the one before it (the first, as long as the second).
    edges = np.concatenate([[tokens[0] - (tokens[1] - tokens[0] if len(tokens) > 1 else 1)], tokens])
    bounded = np.nanmax(values) <= 1.0  # the "card" measure is not bounded: let its scale follow the data
    mesh = heat.pcolormesh(edges, np.arange(depth + 1), values, cmap="viridis", shading="flat",
                           vmin=0.0 if bounded else None, vmax=1.0 if bounded else None)
    # The colour bar sits in an inset beside the axes, so the panels above and below keep their width.
    fig.colorbar(mesh, cax=heat.inset_axes([1.01, 0.0, 0.015, 1.0]), label=f"{measure} utilization")
    heat.set_ylabel("layer")
    if threshold is None:
        share.set_visible(False)
        return
    above = [sum(u > threshold for u in r["utilization"]) / len(r["utilization"]) for r in records]
    share.plot(tokens, above, lw=1.2, label=f"layers above {threshold:g}")
    if fraction is not None:
        share.axhline(fraction, color="black", ls=":", lw=0.8, label=f"grows at {fraction:g}")
    share.set_ylim(-0.05, 1.05)
    share.set_ylabel("share of layers")
    share.legend(loc="lower right", fontsize=8)
