"""Does growing save compute? The final model trained from scratch against growth schedules.

The same final architecture is trained two ways, on the same data in the same
order, for the same token budget and the same learning-rate schedule (linear
warm-up over 30 % of the steps by default, cosine decay over the rest of the budget):

* **scratch**: the final model from step 0;
* **growth**: each schedule of ``--schedules`` starts smaller and grows, exactly
  as ``arbor train`` grows (``Trainer.grow``: insertion policy, init scheme,
  optimizer carry-over), into the final architecture.

Scratch runs at each peak learning rate of ``--lrs``, every growth schedule at
each of ``--growth-lrs`` (at least three each), and the best run of each arm is
the one reported, so no arm is handicapped by one learning rate; a best rate at
the edge of its sweep is flagged. Training FLOPs are counted at every optimizer step from the model
that ran it (`arbor.training.flops`: forward plus backward of the parameters present
then, attention included). Validation loss on held-out files is measured at
regular FLOP intervals (``--evals`` per scratch budget), at every growth step
and at the end.

The headline is the **FLOPs ratio**: the FLOPs at which the best growth run
first reaches the best scratch run's final validation loss (interpolated
linearly between evaluations), divided by the scratch run's total FLOPs. Below
1, growing saved compute. A growth run that has not reached the target when
its budget ends trains on (same data order, final learning rate) until it does
or until it has spent 1.5x the scratch FLOPs; then the ratio is ``>1.5``.
Beside it: both losses at equal FLOPs (the growth run's total).

    python benches/efficiency.py                         # the standard size on stdlib: 10-25 min on 2 cores
    python benches/efficiency.py --quick                 # smoke run, seconds
    python benches/efficiency.py --preset efficiency-medium --budget-tokens 2000000
    python benches/efficiency.py --schedules depth,width --growth-lrs 2e-3,4e-3,8e-3 --out runs/eff
    python benches/efficiency.py --schedules my_schedules.json

A schedule file is JSON: ``{"name": {"stages": [[0, {"layers": 0.5}], [0.2, {"layers": 1}]],
"init": {"depth": "zero"}, "policy": "middle"}}``. Each stage is ``[fraction of the token
budget, sizes as fractions of the final model]`` (``layers``, ``ffn``); the first stage (at 0)
is the starting model, each later one a growth step to those sizes. ``init`` names the init
scheme per axis and ``policy`` the insertion policy, as ``plugins.toml`` names components;
optional ``new_param_lr_multiplier``, ``warmup_steps`` (new parameters re-warm),
``rewarm_steps`` (the whole model re-warms) and ``init_settings`` (per axis) go to the growth
step. With ``"trigger": {"name": ..., settings}``
a trigger decides when each later stage comes (write ``null`` for its fraction).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The schedules live beside this file; loaded by path (as the tests do), the folder is not on sys.path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from efficiency_schedules import (  # noqa: E402  (after the path it needs)
    DEFAULT_SCHEDULES,
    SCHEDULES,
    load_schedules,
    plan,
    read_json,
)

#: Final models the benchmark knows besides `arbor.PRESETS` (vocab_size follows the tokenizer).
PRESETS: dict[str, dict[str, Any]] = {
    "efficiency-quick": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2),
    "efficiency-medium": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=6, num_attention_heads=3,
                              num_key_value_heads=3),
}
_COMMON = dict(tie_word_embeddings=True, max_position_embeddings=512, min_layers=1, max_layers=64)

#: The default warm-up as a share of the steps, for every arm.
WARMUP_SHARE = 0.3
RATIO_CAP = 1.5  # a growth run that needs more than this times the scratch FLOPs is reported as ">1.5"


# ------------------------------------------------------------------- the figures
def flops_to_target(curve: list[dict[str, float]], target: float, key: str = "flops") -> float | None:
    """FLOPs (or ``key``: "tokens") at which the evaluations in ``curve`` first reach ``target``.

    Linear interpolation between the last evaluation above the target and the
    first at or below it; None when no evaluation reaches it.
    """
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None:
                return float(point[key])
            (f0, l0), (f1, l1) = (previous[key], previous["val_loss"]), (point[key], point["val_loss"])
            return float(f1) if l0 == l1 else f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
        previous = point
    return None


def loss_at(curve: list[dict[str, float]], flops: float) -> float | None:
    """Validation loss at ``flops``, interpolated linearly between evaluations (None outside them)."""
    for a, b in zip(curve, curve[1:]):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"]:
                return float(b["val_loss"])
            return a["val_loss"] + (b["val_loss"] - a["val_loss"]) * (flops - a["flops"]) / (b["flops"] - a["flops"])
    if curve and curve[-1]["flops"] == flops:
        return float(curve[-1]["val_loss"])
    return None


def compare(scratch: dict[str, Any], growth: dict[str, Any]) -> dict[str, Any]:
    """The FLOPs ratio of one growth run against the scratch run, from their logged evaluations."""
    s_curve, g_curve = scratch["evaluations"], growth["evaluations"]
    target, total = s_curve[-1]["val_loss"], s_curve[-1]["flops"]
    reached = flops_to_target(g_curve, target)
    equal = min(growth["budget_flops"], total)  # the growth run's FLOPs at the end of its token budget
    return {
        "target": target, "scratch_flops": total, "flops_at_target": reached,
        "scratch_tokens": s_curve[-1]["tokens"], "tokens_at_target": flops_to_target(g_curve, target, "tokens"),
        "ratio": None if reached is None or reached > RATIO_CAP * total else reached / total,
        "equal_flops": equal, "growth_loss_at_equal": loss_at(g_curve, equal),
        "scratch_loss_at_equal": loss_at(s_curve, equal),
    }


def ratio_text(ratio: float | None) -> str:
    return f">{RATIO_CAP:g}" if ratio is None else f"{ratio:.2f}"


# ------------------------------------------------------------------- the runs
def final_config(args, tokenizer=None) -> dict[str, Any]:
    """The final architecture's ArborConfig keywords (vocabulary and special tokens from ``tokenizer``)."""
    from arbor import PRESETS as ARBOR_PRESETS

    if args.model_config:
        from arbor.cli.train import read_config_file

        spec = read_config_file(args.model_config)
        preset = spec.pop("preset", None)
        base = dict(ARBOR_PRESETS[preset]) if preset in ARBOR_PRESETS else dict(PRESETS.get(preset, {}), **_COMMON)
        spec = {**base, **spec}
    elif args.preset in PRESETS:
        spec = {**PRESETS[args.preset], **_COMMON}
    elif args.preset in ARBOR_PRESETS:
        spec = dict(ARBOR_PRESETS[args.preset])
    else:
        allowed = ", ".join([*PRESETS, *ARBOR_PRESETS])
        raise ValueError(f"--preset {args.preset!r} is unknown; allowed: {allowed}")
    if tokenizer is not None:
        spec.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    spec.setdefault("max_layers", max(64, spec.get("num_hidden_layers", 1)))
    spec["max_position_embeddings"] = max(spec.get("max_position_embeddings", 0), args.seq_len)
    return spec


class Run:
    """One arm at one learning rate: a Trainer driven step by step, evaluated on a FLOP grid."""

    def __init__(self, name: str, lr: float, model_config: dict[str, Any], events: list[dict[str, Any]],
                 args, data, out: Path, schedule: dict[str, Any] | None = None, selection=None):
        from arbor import ArborForCausalLM
        from arbor.model.config import ArborConfig
        from arbor.training.trainer import TrainConfig, Trainer

        self.name, self.lr, self.events = name, lr, list(events)
        train_blocks, self.val_blocks = data
        torch.manual_seed(args.seed)  # every arm starts from the same random state
        model = ArborForCausalLM._from_config(ArborConfig(**model_config), attn_implementation="sdpa")
        schedule = schedule or {}
        growth = {k: schedule[k] for k in ("new_param_lr_multiplier", "warmup_steps", "rewarm_steps") if k in schedule}
        trigger = dict(schedule.get("trigger") or {"name": "schedule", "steps": [10**12]})  # default: never fires
        self.triggered = bool(schedule.get("trigger"))
        config = TrainConfig(
            data="(benchmark)", seq_len=args.seq_len, batch_size=args.batch_size, lr=lr, max_steps=args.steps,
            warmup_steps=args.warmup_steps, seed=args.seed, sample_tokens=0,
            eval_batches=math.ceil(len(self.val_blocks) / args.batch_size),
            growth={"trigger": trigger.pop("name"), "trigger_settings": trigger, **growth},
        )
        self.dir = out / f"{name}-lr{lr:g}"
        if (self.dir / "metrics.jsonl").exists():
            (self.dir / "metrics.jsonl").unlink()
        self.trainer = Trainer(model, config, train_blocks, self.val_blocks, self.dir, plugins=selection,
                               progress=False, echo=lambda *a, **k: None)
        self.evaluations: list[dict[str, Any]] = []
        self.growth: list[dict[str, Any]] = []
        self.losses: list[list[float]] = []
        self.seconds = 0.0
        self.budget_flops: int | None = None

    def evaluate(self) -> float:
        t = self.trainer
        loss = t.evaluate()  # every block of the evaluation subset: eval_batches covers it
        self.evaluations.append({"step": t.step, "tokens": t.tokens, "flops": t.flops.total, "val_loss": loss})
        return loss

    def train(self, until_step: int, eval_every: float, stop=None, bar=None) -> None:
        """Train to optimizer step ``until_step`` (stop early when ``stop(flops, loss)`` says so)."""
        from arbor_plugins import Decision

        t = self.trainer
        started = time.perf_counter()
        if not self.evaluations:
            self.evaluate()
        next_eval = (math.floor(t.flops.total / eval_every) + 1) * eval_every
        while t.step < until_step:
            loss = t.train_step()
            self.losses.append([t.step, t.tokens, t.flops.total, loss])
            grew = False
            due = []
            if self.triggered:  # the schedule's trigger says when; its stages say how much
                t.trigger.observe(t.step, t.tokens, loss, t.model)
                decision = t.trigger.decide(t.step, t.tokens, t.model)
                if decision.grow and self.events:
                    due.append((self.events.pop(0), decision.reason))
            while self.events and self.events[0]["step"] is not None and t.step >= self.events[0]["step"]:
                event = self.events.pop(0)
                due.append((event, f"schedule: step {event['step']}"))
            for event, reason in due:
                for spec in event["specs"]:
                    record = t.grow(Decision(True, reason, spec))
                    self.growth.append({**record, "flops": t.flops.total})
                grew = True
            if grew or t.flops.total >= next_eval or t.step == until_step:
                loss_now = self.evaluate()
                next_eval = (math.floor(t.flops.total / eval_every) + 1) * eval_every
                if stop is not None and stop(t.flops.total, loss_now):
                    break
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{self.name} lr={self.lr:g} loss={loss:.3f}", refresh=False)
        self.seconds += time.perf_counter() - started

    def result(self) -> dict[str, Any]:
        return {"arm": self.name, "lr": self.lr, "evaluations": self.evaluations, "growth": self.growth,
                "budget_flops": self.budget_flops, "final_val_loss": self.final_loss, "seconds": self.seconds,
                "params": sum(p.numel() for p in self.trainer.model.parameters()),
                "train_loss": self.losses[:: max(1, len(self.losses) // 200)]}

    @property
    def final_loss(self) -> float:
        """Validation loss at the end of the token budget."""
        at_budget = [e for e in self.evaluations if e["step"] <= self.trainer.config.max_steps]
        return at_budget[-1]["val_loss"]


class Recorded:
    """A finished run read back from an earlier report (``--scratch-from``)."""

    def __init__(self, result: dict[str, Any]):
        self._result = result
        self.name, self.lr, self.evaluations = result["arm"], result["lr"], result["evaluations"]
        self.budget_flops, self.final_loss = result["budget_flops"], result["final_val_loss"]

    def result(self) -> dict[str, Any]:
        return self._result


#: What must be equal for the scratch runs of an earlier report to stand in for this one's.
SCRATCH_SETTINGS = ("data", "seq_len", "batch_size", "vocab_size", "steps", "lrs", "warmup_steps", "evals",
                    "eval_blocks", "seed", "plugins")


def run_settings(args, final: dict[str, Any]) -> dict[str, Any]:
    return {**{k: getattr(args, k) for k in SCRATCH_SETTINGS}, "final_model": final}


def recorded_scratch(path: str, settings: dict[str, Any]) -> list[Recorded]:
    """The scratch runs of the report at ``path``, if it was made with ``settings``; else ValueError."""
    report = read_json(path, "--scratch-from")
    saved = report.get("settings") if isinstance(report, dict) else None
    if not isinstance(saved, dict) or report.get("partial"):
        raise ValueError(f"--scratch-from {path}: not a finished report of this benchmark (no settings recorded)")
    differ = [k for k in settings if json.dumps(saved.get(k), sort_keys=True) != json.dumps(settings[k], sort_keys=True)]
    if differ:
        raise ValueError(f"--scratch-from {path}: its runs were made with other settings ({', '.join(differ)}: "
                         f"{', '.join(f'{saved.get(k)!r} there, {settings[k]!r} here' for k in differ[:2])})")
    runs = [Recorded(r) for r in report["runs"] if r["arm"] == "scratch"]
    if sorted(r.lr for r in runs) != sorted(settings["lrs"]):
        raise ValueError(f"--scratch-from {path}: holds scratch runs at {sorted(r.lr for r in runs)}, not at "
                         f"every rate of --lrs")
    return runs


def prepare_data(args):
    """Tokenizer and blocks, exactly as ``arbor train`` builds them; a fixed evaluation subset."""
    from arbor.cli.train import prepare
    from arbor.training.config import TrainConfig

    config = TrainConfig(data=args.data, vocab_size=args.vocab_size, seq_len=args.seq_len, seed=args.seed)
    tokenizer, train_blocks, val_blocks = prepare(config, echo=lambda m: print(m, file=sys.stderr))
    if len(val_blocks) > args.eval_blocks:  # spread over every held-out file, the same blocks for every run
        index = torch.linspace(0, len(val_blocks) - 1, args.eval_blocks).round().long()
        val_blocks = val_blocks[index]
    return tokenizer, train_blocks, val_blocks


def run_benchmark(args) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from arbor.model.config import ArborConfig
    from arbor.training.flops import training_flops_per_token

    started = time.perf_counter()
    schedules = load_schedules(args.schedules)
    lrs, growth_lrs = args.lrs, args.growth_lrs
    tokenizer, train_blocks, val_blocks = prepare_data(args)
    tokens_per_step = args.batch_size * args.seq_len
    args.steps = max(1, args.budget_tokens // tokens_per_step)
    final = final_config(args, tokenizer)
    scratch_flops = training_flops_per_token(ArborConfig(**final), args.seq_len) * tokens_per_step * args.steps
    eval_every = scratch_flops / args.evals
    plans = {name: plan(s, final, args.steps, tokens_per_step) for name, s in schedules.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selection = None
    if args.plugins:
        from arbor.plugins.selection import load_plugins_toml

        selection = load_plugins_toml(args.plugins)
    params = sum(p.numel() for p in _build(final).parameters())
    print(f"final model: {final['num_hidden_layers']} layers, hidden {final['hidden_size']}, FFN "
          f"{final['intermediate_size']}, vocab {final['vocab_size']}: {params:,} parameters; budget "
          f"{args.steps * tokens_per_step:,} tokens ({args.steps:,} steps of {tokens_per_step:,}), "
          f"{args.steps * tokens_per_step / params:.2f} tokens per parameter; "
          f"{len(train_blocks) * args.seq_len:,} training tokens available", file=sys.stderr)
    settings = run_settings(args, final)
    reused = recorded_scratch(args.scratch_from, settings) if args.scratch_from else []
    if reused:
        print(f"scratch: the {len(reused)} runs of {args.scratch_from}, made with the same settings", file=sys.stderr)
    runs: dict[str, list[Run]] = {"scratch": []}
    total = args.steps * (len(lrs) * (not reused) + len(growth_lrs) * len(schedules))
    bar = tqdm(total=total, desc="efficiency", unit="step", dynamic_ncols=True, disable=args.no_progress)
    data = (train_blocks, val_blocks)

    def finished(arm: str, run: Run) -> None:
        if run.budget_flops is None:  # the FLOPs at the end of the token budget, not of an extension
            run.budget_flops = run.trainer.flops.total
        runs[arm].append(run)
        # Every finished run is on disk at once: a crash or Ctrl-C loses only the run in progress.
        partial = {"partial": True, "settings": settings,
                   "runs": [r.result() for group in runs.values() for r in group]}
        (out / "efficiency.json").write_text(json.dumps(partial, indent=1, default=str), encoding="utf-8")

    for lr in [] if reused else lrs:
        run = Run("scratch", lr, final, [], args, data, out, selection=selection)
        run.train(args.steps, eval_every, bar=bar)
        finished("scratch", run)
    runs["scratch"].extend(reused)
    best_scratch = min(runs["scratch"], key=lambda r: r.final_loss)
    target = best_scratch.final_loss
    comparisons = {}
    for name, p in plans.items():
        runs[name] = []
        for lr in growth_lrs:
            run = Run(name, lr, p["start"], p["events"], args, data, out, schedule=schedules[name],
                      selection=selection)
            run.train(args.steps, eval_every, bar=bar)
            finished(name, run)
        # Best of the arm: the run that reaches the target first, else the lowest final loss.
        results = [(compare(best_scratch.result(), r.result()), r) for r in runs[name]]
        reached = [(c["flops_at_target"], r) for c, r in results if c["flops_at_target"] is not None]
        best = min(reached, key=lambda x: x[0])[1] if reached else min(runs[name], key=lambda r: r.final_loss)
        if flops_to_target(best.evaluations, target) is None:
            # Train on past the budget (final learning rate, same data order) up to 1.5x the scratch FLOPs.
            cap = RATIO_CAP * best_scratch.budget_flops
            extra = tqdm(desc=f"{name}: on to 1.5x", unit="step", leave=False, disable=args.no_progress)
            best.train(10**9, eval_every, stop=lambda flops, loss: loss <= target or flops >= cap, bar=extra)
            extra.close()
            finished(name, runs[name].pop(runs[name].index(best)))  # on disk with its extension
        comparisons[name] = {"lr": best.lr, **compare(best_scratch.result(), best.result())}
    bar.close()
    winner = min(comparisons, key=lambda n: (comparisons[n]["ratio"] is None, comparisons[n]["ratio"] or 0,
                                             comparisons[n]["growth_loss_at_equal"] or math.inf))
    report = {
        "command": " ".join(sys.argv), "settings": settings, "scratch_from": args.scratch_from, "data": args.data, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "budget_tokens": args.steps * tokens_per_step, "steps": args.steps, "lrs": lrs, "growth_lrs": growth_lrs,
        "final_model": final,
        "params": params, "tokens_per_parameter": args.steps * tokens_per_step / params,
        "schedules": {n: {**schedules[n], "plan": plans[n]} for n in schedules},
        "runs": [r.result() for arm in runs.values() for r in arm],
        "scratch": {"lr": best_scratch.lr, "final_val_loss": target, "flops": best_scratch.budget_flops},
        "comparisons": comparisons, "winner": winner, "seconds": time.perf_counter() - started,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
    }
    (out / "efficiency.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    plot(report, out / "efficiency.png")
    return report


def _build(config: dict[str, Any]):
    from arbor import ArborForCausalLM
    from arbor.model.config import ArborConfig

    return ArborForCausalLM._from_config(ArborConfig(**config))


def plot(report: dict[str, Any], path: Path) -> None:
    """Validation loss against FLOPs: every run faint, each arm's best bold, growth steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    best = {"scratch": report["scratch"]["lr"], **{n: c["lr"] for n, c in report["comparisons"].items()}}
    colors = {}
    for run in report["runs"]:
        arm = run["arm"]
        curve = run["evaluations"][1:]  # the untrained model's loss would squash the axis
        xs, ys = [e["flops"] for e in curve], [e["val_loss"] for e in curve]
        chosen = run["lr"] == best.get(arm)
        line, = ax.plot(xs, ys, color=colors.get(arm), lw=2 if chosen else 0.8, alpha=1 if chosen else 0.35,
                        label=f"{arm} (lr {run['lr']:g})" if chosen else None)
        colors.setdefault(arm, line.get_color())
        if chosen:
            for g in run["growth"]:
                ax.axvline(g["flops"], color=colors[arm], ls=":", lw=1)
    ax.axhline(report["scratch"]["final_val_loss"], color="grey", ls="--", lw=1, label="scratch's final loss")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (held-out files)")
    comparison = report["comparisons"][report["winner"]]
    ax.set_title(f"{report['winner']}: FLOPs ratio {ratio_text(comparison['ratio'])} "
                 f"({report['params']:,} params, {report['budget_tokens']:,} tokens)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    top = max(e["val_loss"] for r in report["runs"] for e in r["evaluations"][1:2])
    ax.set_ylim(top=top)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _edge(lr: float, swept: list[float]) -> str:
    """A warning when the best rate is the sweep's smallest or largest: the optimum may lie outside it."""
    return " (at the edge of the sweep: widen it)" if lr in (min(swept), max(swept)) else ""


def summary_lines(report: dict[str, Any]) -> list[str]:
    s = report["scratch"]
    lines = [f"scratch: best lr {s['lr']:g}, final validation loss {s['final_val_loss']:.4f}, "
             f"{s['flops']:.3e} FLOPs{_edge(s['lr'], report['lrs'])}"]
    for name, c in report["comparisons"].items():
        at = "never within 1.5x" if c["ratio"] is None else \
            f"at {c['flops_at_target']:.3e} FLOPs and {c['tokens_at_target']:,.0f} tokens"
        lines.append(f"{name}: best lr {c['lr']:g}{_edge(c['lr'], report['growth_lrs'])}, reaches the target {at}, "
                     f"ratio {ratio_text(c['ratio'])}; "
                     f"at {c['equal_flops']:.3e} FLOPs growth {c['growth_loss_at_equal']:.4f} vs scratch "
                     f"{c['scratch_loss_at_equal']:.4f}")
    c = report["comparisons"][report["winner"]]
    verdict = "saved compute" if c["ratio"] is not None and c["ratio"] < 1 else "did not save compute"
    lines.append(
        f"FLOPs ratio {ratio_text(c['ratio'])} ({report['winner']}: growing {verdict}; scratch's final validation "
        f"loss {c['target']:.4f}; at equal FLOPs {c['equal_flops']:.3e}: growth {c['growth_loss_at_equal']:.4f}, "
        f"scratch {c['scratch_loss_at_equal']:.4f})")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="stdlib", help="any data `arbor train --data` takes (default: stdlib)")
    p.add_argument("--preset", default="small",
                   help=f"the final model: {', '.join(PRESETS)} or an arbor preset (default: small)")
    p.add_argument("--model-config", help="a TOML/YAML/JSON file of ArborConfig keys for the final model")
    p.add_argument("--budget-tokens", type=int, default=1_228_800, help="training tokens per run")
    p.add_argument("--schedules", default=DEFAULT_SCHEDULES,
                   help=f"comma-separated: {', '.join(SCHEDULES)}; or a JSON file (default: {DEFAULT_SCHEDULES})")
    p.add_argument("--lrs", default="1e-2,1.4e-2,2e-2",
                   help="peak learning rates swept for scratch (at least 3; default: 1e-2,1.4e-2,2e-2)")
    p.add_argument("--growth-lrs", default="1e-2,1.4e-2,2e-2",
                   help="peak learning rates swept for every growth schedule (at least 3; default: 1e-2,1.4e-2,2e-2)")
    p.add_argument("--out", default="runs/efficiency", help="directory for efficiency.json, efficiency.png, runs")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (tiny model and budget)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up of every arm (default: {WARMUP_SHARE * 100:.0f} %% of the steps; a 2 %% "
                        "warm-up left scratch and growth alike about 0.3 nats short, docs/benchmarks.md)")
    p.add_argument("--evals", type=int, default=24, help="evaluations per scratch budget")
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks every evaluation reads")
    p.add_argument("--plugins", help="a plugins.toml whose components schedules without their own names use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch-from", metavar="FILE",
                   help="take the scratch runs from an earlier efficiency.json made with the same settings (data, "
                        "model, budget, --lrs, ...) instead of training them again; refused if any differs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # small defaults; options given on the command line still win
        quick = dict(data="builtin", preset="efficiency-quick", budget_tokens=12_288, vocab_size=512, seq_len=32,
                     batch_size=8, evals=6, eval_blocks=8, schedules="depth")
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    for name in ("lrs", "growth_lrs"):
        flag = f"--{name.replace('_', '-')}"
        try:
            values = [float(x) for x in getattr(args, name).split(",") if x.strip()]
        except ValueError:
            p.error(f"{flag} {getattr(args, name)!r}: expected comma-separated numbers")
        if len(set(values)) < 3 or any(not (lr > 0 and math.isfinite(lr)) for lr in values):
            p.error(f"{flag}: give at least three different positive learning rates")
        setattr(args, name, sorted(set(values)))
    for name in ("budget_tokens", "seq_len", "batch_size", "evals", "eval_blocks", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_steps is None:
        args.warmup_steps = max(1, round(WARMUP_SHARE * (args.budget_tokens // (args.batch_size * args.seq_len))))
    return args, p


def check(args) -> None:
    """Options that need no data, checked before the corpus is read."""
    if args.model_config and not Path(args.model_config).is_file():
        raise ValueError(f"--model-config {args.model_config}: no such file")
    final = final_config(args)
    steps = max(1, args.budget_tokens // (args.batch_size * args.seq_len))
    for name, schedule in load_schedules(args.schedules).items():
        try:
            plan(schedule, final, steps, args.batch_size * args.seq_len)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"schedule {name!r}: {exc}") from None


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    try:
        check(args)
        report = run_benchmark(args)
    except ValueError as exc:  # bad input: one line, exit code 2
        parser.exit(2, f"efficiency: error: {exc}\n")
    print(f"wrote {Path(args.out) / 'efficiency.json'} and {Path(args.out) / 'efficiency.png'} "
          f"({report['seconds']:.0f} s)")
    for line in summary_lines(report):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
