"""``arbor plot RUN_DIR``: a training run at a glance, from its ``metrics.jsonl``.

Two panels share the x axis (tokens seen): the training loss (and validation
loss) with every growth event marked, and the parameter count over time.
Uses matplotlib (a dependency of arbor) without a display (the Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path


class PlotError(ValueError):
    """The run directory has nothing to plot (one-line message)."""


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file; give the --out directory of an 'arbor train' run")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line may be cut short (by a crash)
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
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    top.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        top.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", ms=3)
    for e in events:
        for ax in (top, bottom):
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
    bottom.set_xlabel("tokens seen")
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "training.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
