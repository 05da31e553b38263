"""Throughput of `ArborForCausalLM` against `transformers.LlamaForCausalLM`, in one process.

Both models are built from the same config (`arbor.growth.export.to_llama_config`) and
hold the very same weights, so every difference measured is a difference in
code. Three metrics:

1. training step: forward + backward + ``torch.optim.AdamW`` step + zero_grad
   on random token batches (labels = inputs);
2. generation: greedy ``generate`` of exactly ``--new-tokens`` tokens with the
   KV cache, for a small batch of prompts (prefill included in the time);
3. statistics overhead: the arbor training step with ``stats_interval = 1``
   (every forward, the worst case) and a plugin implementing
   ``arbor_pre_forward_stats`` that accumulates mean |h| on the device, against
   the same model with statistics off;
4. with ``--compile``: the training step of ``torch.compile``-d arbor (``fullgraph=True``)
   against eager Llama and against Llama compiled the same way, timed in one alternation
   (compile time is spent in the warm-up, not timed);
5. ``--metrics distributed``: arbor's own training in ``--nproc`` processes under torchrun
   (`arbor.training.trainer.Trainer`, data parallel and sharded by FSDP2) against the same
   Trainer in one process, at the same per-rank batch: tokens/s of all ranks together, and what
   one growth step (with its checks) and the first step after it (DDP's wrapper rebuilt, or
   FSDP's root taking the new layers in) cost, in training steps. Each side is a
   fresh torchrun launch (``benches/distributed_worker.py``); launches alternate, ``--dist-rounds``
   of each.

Method: warm-up first; then each round runs A and B back to back (the order
flips every round, A B / B A, so neither side always runs on a warmer cache);
the median time over rounds is taken per model and metric, and the ratio of
medians is printed. Paired per-round ratios are printed too: their spread is
the noise floor that a ratio must clear to mean anything. A round in which
either run took more than ``--noise-cap`` times its fastest (another process
took the cores) is re-run, and reported as disturbed.

    python benches/throughput.py                       # CPU: ~40 s on two cores
    python benches/throughput.py --device cuda --dtype bfloat16 --preset bench-large
    python benches/throughput.py --json runs/throughput.json
    python benches/throughput.py --metrics training --compile   # + compiled rows (inductor: minutes to compile on a CPU)
    python benches/throughput.py --metrics distributed --nproc 2  # 2 ranks against 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import LlamaForCausalLM

import arbor_plugins
from arbor import PRESETS, ArborConfig, ArborForCausalLM
from arbor.growth.export import to_llama_config
from arbor.plugins import get_plugin_manager

#: Benchmark-only sizes; the names of `arbor.PRESETS` are accepted as well.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # Runs each metric in seconds on two CPU cores.
    "bench-small": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    # The default: large enough that matmuls dominate a training step on a CPU.
    "bench-mid": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4,
    ),
    # For a GPU: ~120M parameters.
    "bench-large": dict(
        vocab_size=32_000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4,
    ),
}
DEFAULT_PRESET = "bench-mid"
ATTN_CHOICES = ("sdpa", "eager", "flex_attention", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- models
def build_config(args: argparse.Namespace) -> ArborConfig:
    needed = max(args.seq, args.prompt_len + args.new_tokens)
    if args.preset in BENCH_PRESETS:
        kwargs = dict(BENCH_PRESETS[args.preset])
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs["max_position_embeddings"] = max(1024, needed)
        return ArborConfig(**kwargs)
    config = ArborConfig.from_preset(args.preset)
    if config.max_position_embeddings < needed:
        config = ArborConfig.from_preset(args.preset, max_position_embeddings=needed)
    return config


def build_pair(config: ArborConfig, args: argparse.Namespace) -> tuple[ArborForCausalLM, LlamaForCausalLM]:
    """Arbor and Llama at the same config, holding the same weights, on the device and dtype asked for."""
    torch.manual_seed(args.seed)
    arbor = ArborForCausalLM._from_config(config, attn_implementation=args.attn)
    llama = LlamaForCausalLM._from_config(to_llama_config(config), attn_implementation=args.attn)
    missing, unexpected = llama.load_state_dict(arbor.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"state dicts differ: missing={missing}, unexpected={unexpected}")
    dtype = DTYPES[args.dtype]
    return arbor.to(args.device, dtype), llama.to(args.device, dtype)


class StatsAccumulator:
    """A stats plugin as cheap as a real one can be: a running sum of mean |h| per layer, kept on the device."""

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None
        self.calls = 0

    @arbor_plugins.hookimpl
    def arbor_pre_forward_stats(self, model, layer_idx, hidden_states, step):
        if self.totals is None:
            n = model.config.num_hidden_layers
            self.totals = torch.zeros(n, device=hidden_states.device, dtype=torch.float32)
        # No .item(): the sum stays on the device, so no host synchronisation per layer.
        self.totals[layer_idx] += hidden_states.abs().mean(dtype=torch.float32)
        self.calls += 1


# ----------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], repeats: int, device: str) -> float:
    """Seconds per call of ``fn``, over ``repeats`` calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def alternate(
    runs: dict[str, Callable[[], None]], rounds: int, repeats: int, warmup: int, device: str, noise_cap: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each of two callables, alternated A B / B A, over ``rounds`` clean rounds.

    A round is *disturbed* when either side took more than ``noise_cap`` times its
    fastest round: on a shared machine another process grabbed the cores (two
    OpenMP threads fighting a neighbour run 10-20x slower, which no median of a
    handful of rounds survives). Disturbed rounds are re-run, up to ``rounds``
    extra; returns (clean rounds, every round) so nothing measured is hidden.
    """
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    synchronize(device)
    every: dict[str, list[float]] = {name: [] for name in names}

    def clean() -> dict[str, list[float]]:
        best = {name: min(ts) for name, ts in every.items()}
        keep = [
            i for i in range(len(every[names[0]]))
            if all(every[n][i] <= noise_cap * best[n] for n in names)
        ]
        return {name: [every[name][i] for i in keep] for name in names}

    for r in range(2 * rounds):
        if r >= rounds and len(clean()[names[0]]) >= rounds:
            break
        for name in names if r % 2 == 0 else reversed(names):
            every[name].append(timed(runs[name], repeats, device))
    kept = clean()
    if len(kept[names[0]]) < max(3, rounds // 2):  # too few quiet rounds: use everything, and say so
        kept = every
    return kept, every


def summarise(
    measured: tuple[dict[str, list[float]], dict[str, list[float]]], tokens_per_call: int, a: str, b: str
) -> dict[str, Any]:
    """Medians, tokens/s and the ratio of A to B (>1: A is faster), with the spread of paired ratios."""
    times, every = measured
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    paired = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
    q = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) >= 2 else [paired[0]] * 3
    return {
        "seconds_per_call": times,  # the clean rounds the figures below come from
        "seconds_per_call_all_rounds": every,
        "rounds_used": len(times[a]),
        "rounds_disturbed": len(every[a]) - len(times[a]),
        "median_seconds": med,
        "min_seconds": best,
        "tokens_per_call": tokens_per_call,
        "tokens_per_second": {name: tokens_per_call / m for name, m in med.items()},
        "ratio": med[b] / med[a],  # throughput of A over throughput of B, from the medians
        "ratio_of_minimums": best[b] / best[a],  # the same from the fastest run of each
        "paired_ratio_quartiles": q,  # per-round B/A time ratios: their spread is the noise floor
    }


# ----------------------------------------------------------------------------- metrics
def make_train_step(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    state = {"i": 0}

    def step() -> None:
        ids = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_generate(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, out: dict) -> Callable[[], None]:
    mask = torch.ones_like(prompts)

    @torch.inference_mode()
    def gen() -> None:
        out["ids"] = model.generate(
            input_ids=prompts, attention_mask=mask, do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )

    return gen


def bench_generation(arbor, llama, args, config) -> dict[str, Any]:
    arbor.eval()
    llama.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, config.vocab_size, (args.gen_batch, args.prompt_len), generator=g).to(args.device)
    outs: dict[str, dict] = {"arbor": {}, "llama": {}}
    runs = {
        "arbor": make_generate(arbor, prompts, args.new_tokens, outs["arbor"]),
        "llama": make_generate(llama, prompts, args.new_tokens, outs["llama"]),
    }
    times = alternate(runs, args.rounds, 1, args.warmup, args.device, args.noise_cap)
    result = summarise(times, args.gen_batch * args.new_tokens, "arbor", "llama")
    ids_a, ids_b = outs["arbor"]["ids"], outs["llama"]["ids"]
    assert ids_a.shape[1] == args.prompt_len + args.new_tokens, ids_a.shape
    result["same_greedy_output"] = bool(torch.equal(ids_a, ids_b))
    return result


def bench_training(arbor, llama, args, config, batches) -> dict[str, Any]:
    arbor.train()
    llama.train()
    runs = {"arbor": make_train_step(arbor, batches, args.lr), "llama": make_train_step(llama, batches, args.lr)}
    times = alternate(runs, args.rounds, args.steps, args.warmup, args.device, args.noise_cap)
    return summarise(times, args.batch * args.seq, "arbor", "llama")


def bench_compiled(arbor, llama, args, batches) -> dict[str, Any]:
    """Compiled arbor against eager Llama and compiled Llama, alternated in the same rounds."""
    arbor.train()
    llama.train()
    options = {"fullgraph": True, "backend": args.compile_backend}
    if args.compile_mode:
        options["mode"] = args.compile_mode
    runs = {
        "arbor_compiled": make_train_step(torch.compile(arbor, **options), batches, args.lr),
        "llama": make_train_step(llama, batches, args.lr),
        "llama_compiled": make_train_step(torch.compile(llama, **options), batches, args.lr),
    }
    started = time.perf_counter()
    for name in ("arbor_compiled", "llama_compiled"):  # compile (and the first run) outside the timing
        runs[name]()
    compile_seconds = time.perf_counter() - started
    times = alternate(runs, args.rounds, args.steps, args.warmup, args.device, args.noise_cap)
    tokens = args.batch * args.seq
    results = {
        "compiled_vs_llama": summarise(times, tokens, "arbor_compiled", "llama"),
        "compiled_vs_llama_compiled": summarise(times, tokens, "arbor_compiled", "llama_compiled"),
    }
    for result in results.values():
        result["compile_options"] = {k: str(v) for k, v in options.items()}
        result["compile_seconds_both"] = compile_seconds
    return results


def bench_stats(arbor, args, batches) -> dict[str, Any]:
    """The same model and optimizer, with ``stats_interval`` switched between 1 and 0."""
    arbor.train()
    plugin = StatsAccumulator()
    pm = get_plugin_manager()
    pm.register(plugin, name="bench-stats")
    try:
        step = make_train_step(arbor, batches, args.lr)

        def with_stats(interval: int) -> Callable[[], None]:
            def run() -> None:
                arbor.stats_interval = interval
                step()

            return run

        runs = {"stats_off": with_stats(0), "stats_on": with_stats(1)}
        stats_rounds = args.stats_rounds or 2 * args.rounds
        times = alternate(runs, stats_rounds, args.steps, args.warmup, args.device, args.noise_cap)
    finally:
        pm.unregister(plugin)
        arbor.stats_interval = 0
    result = summarise(times, args.batch * args.seq, "stats_on", "stats_off")
    med = result["median_seconds"]
    result["overhead_percent"] = 100.0 * (med["stats_on"] / med["stats_off"] - 1.0)
    result["paired_overhead_percent_quartiles"] = [
        100.0 * (1.0 / r - 1.0) for r in reversed(result["paired_ratio_quartiles"])
    ]
    # The hook must really have run: every layer, on every stats-on step (warm-up included).
    on_calls = args.warmup + len(result["seconds_per_call_all_rounds"]["stats_on"]) * args.steps
    expected = on_calls * arbor.config.num_hidden_layers
    if plugin.calls != expected:
        raise RuntimeError(f"stats hook ran {plugin.calls} times, expected {expected}")
    synchronize(args.device)
    result["hook_calls"] = plugin.calls
    result["hook_totals_finite"] = bool(torch.isfinite(plugin.totals).all())
    return result


# ----------------------------------------------------------------------------- report
def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def bench_distributed(config: ArborConfig, args: argparse.Namespace) -> dict[str, Any]:
    """``--nproc`` ranks of arbor's Trainer, data parallel and sharded, against one rank; each launch a
    fresh torchrun (see module doc)."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings")
    spec = json.dumps({k: getattr(config, k) for k in keys})
    # side name -> (processes, --parallel); "2" keeps its name (the ddp side) for older readers of the JSON
    sides = {"1": (1, "ddp"), str(args.nproc): (args.nproc, "ddp"), f"{args.nproc}-fsdp": (args.nproc, "fsdp")}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.dist_rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                nproc, parallel = sides[name]
                out = os.path.join(tmp, f"{name}-{round_}.json")
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), worker, out, "--config", spec, "--batch", str(args.batch), "--seq",
                           str(args.seq), "--steps", str(max(3, args.steps)), "--device", args.device,
                           "--parallel", parallel]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"the {nproc}-process {parallel} launch failed:\n{done.stderr[-2000:]}")
                with open(out) as f:
                    runs[name].append(json.load(f))
    summary: dict[str, Any] = {"runs": runs, "nproc": args.nproc}
    for name, measured in runs.items():
        step = statistics.median(r["step_seconds"] for r in measured)
        key = f"ranks_{name}".replace("-", "_")
        summary[key] = {
            "tokens_per_second": statistics.median(r["tokens_per_s"] for r in measured),
            "growth_in_steps": statistics.median(r["growth_seconds"] for r in measured) / step,
            "first_step_after_growth_in_steps": statistics.median(
                r["first_step_after_growth_seconds"] for r in measured) / step,
        }
    one = summary["ranks_1"]["tokens_per_second"]
    summary["ratio"] = summary[f"ranks_{args.nproc}"]["tokens_per_second"] / one
    summary["ratio_fsdp"] = summary[f"ranks_{args.nproc}_fsdp"]["tokens_per_second"] / one
    return summary


def print_distributed(r: dict[str, Any]) -> None:
    n, one = r["nproc"], r["ranks_1"]
    many, sharded = r[f"ranks_{n}"], r[f"ranks_{n}_fsdp"]
    print(f"distributed {n} ranks {many['tokens_per_second']:>11,.0f} tok/s   "
          f"1 rank {one['tokens_per_second']:>11,.0f} "
          f"tok/s   {n}/1 {r['ratio']:.3f}x  (ddp; same per-rank batch; medians of {len(r['runs']['1'])} launches)")
    print(f"distributed {n} ranks {sharded['tokens_per_second']:>11,.0f} tok/s   "
          f"1 rank {one['tokens_per_second']:>11,.0f} tok/s   {n}/1 {r['ratio_fsdp']:.3f}x  (fsdp)")
    for label, side in ((f"{n} ranks ddp", many), (f"{n} ranks fsdp", sharded), ("1 rank", one)):
        print(f"  growth step, {label}: {side['growth_in_steps']:.2f} training steps, then the first step after "
              f"it {side['first_step_after_growth_in_steps']:.2f} steps")


def print_table(results: dict[str, Any]) -> None:
    rows = []
    for metric, a, b, label in (
        ("training", "arbor", "llama", "arbor/llama"),
        ("generation", "arbor", "llama", "arbor/llama"),
        ("stats", "stats_on", "stats_off", "on/off"),
        ("compiled_vs_llama", "arbor_compiled", "llama", "arbor-compiled/llama"),
        ("compiled_vs_llama_compiled", "arbor_compiled", "llama_compiled", "arbor-compiled/llama-compiled"),
    ):
        if metric not in results:
            continue
        r = results[metric]
        tps = r["tokens_per_second"]
        lo, mid, hi = r["paired_ratio_quartiles"]
        extra = f"  overhead {r['overhead_percent']:+.1f} %" if metric == "stats" else ""
        if r["rounds_disturbed"]:
            extra += f"  [{r['rounds_disturbed']} disturbed rounds re-run]"
        rows.append(
            f"{metric.split('_vs_')[0]:<11} {a:>9} {tps[a]:>11,.0f} tok/s   {b:>9} {tps[b]:>11,.0f} tok/s   "
            f"{label} {r['ratio']:.3f}x  (paired {mid:.3f}, IQR {lo:.3f}-{hi:.3f}; "
            f"best-of {r['ratio_of_minimums']:.3f}){extra}"
        )
    print("\n".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training and generation throughput of ArborForCausalLM against LlamaForCausalLM "
        "(same config, same weights, one process), and the cost of activation statistics. "
        "Prints tokens/s and ratios; a ratio above 1 means arbor is faster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    names = [*BENCH_PRESETS, *PRESETS]
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=names, help="model sizes (bench-* or an arbor preset)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--attn", default="sdpa", choices=ATTN_CHOICES, help="transformers attention implementation")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--batch", type=int, default=4, help="training batch size")
    p.add_argument("--steps", type=int, default=1, help="training steps per timed run")
    p.add_argument("--rounds", type=int, default=12, help="alternating rounds per metric (median over these)")
    p.add_argument("--stats-rounds", type=int, default=None,
                   help="rounds for the stats metric (default: 2 x --rounds, as its differences are small)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model before timing")
    p.add_argument("--noise-cap", type=float, default=1.5,
                   help="a round where a run took more than this times its fastest is disturbed and re-run")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length for generation")
    p.add_argument("--gen-batch", type=int, default=4, help="prompts generated at once")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default="training,generation,stats", help="comma-separated subset to run")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the environment here")
    p.add_argument("--compile", action="store_true",
                   help="also time the training step of torch.compile-d arbor against eager and compiled Llama")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile (e.g. max-autotune)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed metric")
    p.add_argument("--dist-rounds", type=int, default=3, help="launches of each side for the distributed metric")
    args = p.parse_args(argv)
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(args.metrics) - {"training", "generation", "stats", "distributed"}
    if unknown:
        p.error(f"--metrics: unknown {', '.join(sorted(unknown))}; choose from training, generation, stats, "
                "distributed")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.attn == "flash_attention_2" and not args.device.startswith("cuda"):
        p.error("--attn flash_attention_2 needs --device cuda")
    if args.attn == "flex_attention" and args.device == "cpu":
        p.error("--attn flex_attention: flex attention is refused on CPU (its CPU kernels give wrong results); "
                "use --device cuda")
    if args.nproc < 2:
        p.error(f"--nproc {args.nproc}: the distributed metric compares >= 2 processes with one")
    for name in ("seq", "batch", "steps", "rounds", "new_tokens", "prompt_len", "gen_batch", "dist_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    config = build_config(args)
    arbor, llama = build_pair(config, args)
    n_params = sum(p.numel() for p in arbor.parameters())
    env = environment(args)
    print(
        f"arbor vs llama | preset {args.preset}: hidden {config.hidden_size}, layers {config.num_hidden_layers}, "
        f"heads {config.num_attention_heads}/{config.num_key_value_heads} kv, ffn {config.intermediate_size}, "
        f"vocab {config.vocab_size}, {n_params / 1e6:.1f}M params\n"
        f"{args.device} {args.dtype} attn={args.attn} | train batch {args.batch}x{args.seq}, {args.steps} steps/run | "
        f"generate {args.gen_batch}x({args.prompt_len}+{args.new_tokens}) | {args.rounds} rounds, medians\n"
        f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, transformers {env['transformers']}"
        + (f", {env['gpu']}" if "gpu" in env else "")
    )
    g = torch.Generator().manual_seed(args.seed + 2)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(args.device) for _ in range(4)
    ]

    results: dict[str, Any] = {}
    # Generation first, while both models still hold identical weights, so greedy outputs can be compared.
    if "generation" in args.metrics:
        results["generation"] = bench_generation(arbor, llama, args, config)
    if "training" in args.metrics:
        results["training"] = bench_training(arbor, llama, args, config, batches)
    if args.compile:  # before the stats metric, which frees Llama
        results.update(bench_compiled(arbor, llama, args, batches))
    if "stats" in args.metrics:
        del llama  # only arbor is timed from here on; free the memory Llama holds
        results["stats"] = bench_stats(arbor, args, batches)
    if "distributed" in args.metrics:
        results["distributed"] = bench_distributed(config, args)
    elapsed = time.perf_counter() - started

    print()
    print_table(results)
    if "distributed" in results:
        print_distributed(results["distributed"])
    if "generation" in results and not results["generation"]["same_greedy_output"]:
        print("note: greedy outputs of arbor and llama differ (ties in near-uniform logits can flip a token)")
    print(f"\ntotal {elapsed:.0f} s")

    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items()},
            "config": {
                k: getattr(config, k)
                for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
            },
            "parameters": n_params,
            "environment": env,
            "results": results,
            "elapsed_seconds": elapsed,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
