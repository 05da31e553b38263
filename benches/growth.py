"""Cost of arbor's growth operators, against one training step of the same model, in one run.

For a preset (default ``arbor-500m-1b``) four operators are applied, each to a
freshly built model of that preset so that they never compound:

==========  ====================================================================
``depth``   ``grow_depth(4)``: four new layers at the middle of the stack
``ffn``     ``grow_width(1.5 x FFN)`` on every layer
``heads``   ``grow_heads(q + 4)``: four more query heads of unchanged head_dim;
            kv heads stay unless the new query count is not a multiple of them
            (arbor-500m-1b: 16/16 -> 20/20, since 16 does not divide 20)
``hidden``  ``grow_hidden(1.25 x hidden)``: the residual stream
==========  ====================================================================

Each runs twice: on a bare model, and on a model with an ``AdamW`` optimizer
that holds state (one training step taken first), passed as ``optimizer=`` so
the optimizer carry-over is part of the cost. Two figures per run:

1. **time**, against one training step (forward + backward + AdamW step +
   ``zero_grad``) of the same model on a ``--batch`` x ``--seq`` token batch,
   measured in the same process; target: ratio < 1.
2. **peak extra memory** during the growth call, against the bytes it adds:
   new parameter elements (numel after - numel before) x element size, plus,
   with an optimizer, the optimizer state added. Target: peak <= 1.1 x added.
   On CUDA it is ``torch.cuda.max_memory_allocated`` minus the bytes allocated
   before the call. On CPU, where PyTorch keeps no such counter, it is
   `LiveStorageTracker`: every tensor storage an operator creates counts while
   it lives, every storage that existed before counts negatively once freed,
   so the figure is the peak change in live tensor bytes. ``--allocator-check``
   cross-checks it against the allocations the PyTorch profiler sees.

Timing runs and memory runs use separate fresh models, so the tracker's
bookkeeping is never timed.

    python benches/growth.py                          # arbor-500m-1b on CPU: ~5 min on two quiet cores
    python benches/growth.py --preset tiny            # seconds
    python benches/growth.py --device cuda --dtype bfloat16 --seq 1024 --batch 8
    python benches/growth.py --json runs/growth.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import weakref
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from arbor import PRESETS, ArborConfig, ArborForCausalLM, count_parameters

OPERATORS = ("depth", "ffn", "heads", "hidden")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIME_TARGET = 1.0  # growth time / training step time must stay below this
MEMORY_TARGET = 1.1  # peak extra memory / bytes added must stay at or below this
MB = 1e6


# ----------------------------------------------------------------------------- memory
def _group(label: str) -> str:
    """One label for the same tensor in every layer."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", label)


class LiveStorageTracker(TorchDispatchMode):
    """The change in live tensor-storage bytes while active: running total and peak.

    A storage returned by an operator is counted when first seen and uncounted
    when it dies: `weakref.finalize` on its `UntypedStorage`, which PyTorch keeps
    as one Python object for as long as the storage lives. Storages that existed
    before (given to `watch`, or first seen as an operator's input) count only
    when freed, negatively. ``peak`` is thus the peak extra memory of the code run
    inside, and ``at_peak`` says what made it up: bytes of new storages by the
    operator that created them (``new: aten.empty`` ...) and old storages already
    freed (``freed: <name>``, negative). Blind spot: scratch buffers a kernel
    allocates and frees inside one operator call (``--allocator-check`` sizes them).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.born_current = self.born_peak = 0  # new storages only, frees of old ones ignored
        self.by_label: dict[str, int] = defaultdict(int)
        self.at_peak: dict[str, int] = {}
        self._live: dict[int, tuple[int, str, bool]] = {}
        self._finalizers: list[weakref.finalize] = []
        self._open = True

    def watch(self, tensors: dict[str, torch.Tensor]) -> None:
        """Name storages that exist already, so their release is counted and labelled."""
        for name, t in tensors.items():
            self._track(t, _group(name), born=False)

    def _track(self, t: torch.Tensor, label: str, born: bool) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self._live:
            old_bytes, old_label, old_born = self._live[key]
            if born and nbytes != old_bytes:  # resized in place (an out= operator)
                self._live[key] = (nbytes, old_label, old_born)
                self._change("new: " + label, nbytes - old_bytes, born=True)
            return
        self._live[key] = (nbytes, label, born)
        self._finalizers.append(weakref.finalize(storage, self._release, key))
        if born:
            self._change("new: " + label, nbytes, born=True)

    def _release(self, key: int) -> None:
        nbytes, label, born = self._live.pop(key)
        if self._open:
            self._change(("new: " if born else "freed: ") + label, -nbytes, born)

    def _change(self, label: str, delta: int, born: bool) -> None:
        self.current += delta
        self.by_label[label] += delta
        if born:
            self.born_current += delta
            self.born_peak = max(self.born_peak, self.born_current)
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        # lift_fresh wraps a tensor that torch.tensor() built outside the dispatcher: it is new.
        fresh = func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy)
        for t in tree_leaves((args, kwargs)):  # inputs first: a view of an old tensor is no new storage
            if isinstance(t, torch.Tensor):
                self._track(t, name if fresh else "input of " + name, born=fresh)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, name, born=True)
        return out

    def __exit__(self, *exc):
        self._open = False  # later frees are not part of the measured call
        for f in self._finalizers:
            f.detach()
        return super().__exit__(*exc)

    def held_past_peak(self) -> dict[str, int]:
        """Old storages alive at the peak and freed later in the call: memory growth held twice."""
        late = {k: self.at_peak.get(k, 0) - v for k, v in self.by_label.items() if k.startswith("freed: ")}
        return {k[len("freed: "):]: v for k, v in sorted(late.items(), key=lambda kv: -kv[1]) if v > 0}


def allocator_born_peak(prof) -> int | None:
    """Peak bytes allocated during ``prof`` and not yet freed, from the profiler's CPU allocation events.

    The allocator reports every block, kernel scratch buffers included; frees
    are matched to allocations by address here, because the allocator cannot
    size blocks allocated before profiling began. So this is comparable to
    ``LiveStorageTracker.born_peak``, not ``peak``. None where the private
    profiler API differs.
    """
    try:
        from torch._C._profiler import _EventType

        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            f = e.extra_fields
            if e.tag == _EventType.Allocation and str(f.device).startswith("cpu"):
                events.append((e.start_time_ns, f.alloc_size, f.ptr))
    except (AttributeError, ImportError, RuntimeError):
        return None
    born: dict[int, int] = {}
    current = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            born[ptr] = size
            current += size
            peak = max(peak, current)
        else:
            current -= born.pop(ptr, 0)
    return peak


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def optimizer_tensors(optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    if optimizer is None:
        return {}
    return {
        f"optimizer.state[{names.get(id(p), '?')}].{k}": v
        for p, state in optimizer.state.items()
        for k, v in state.items()
        if torch.is_tensor(v)
    }


# ----------------------------------------------------------------------------- models
def build_config(args: argparse.Namespace) -> ArborConfig:
    config = ArborConfig.from_preset(args.preset)
    overrides: dict[str, Any] = {}
    if config.max_position_embeddings < args.seq:
        overrides["max_position_embeddings"] = args.seq
    depth = args.depth if args.depth is not None else 4
    if config.max_layers is not None and config.num_hidden_layers + depth > config.max_layers:
        overrides["max_layers"] = config.num_hidden_layers + depth  # room for the depth operator
    return ArborConfig.from_preset(args.preset, **overrides) if overrides else config


def growth_targets(config: ArborConfig, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each operator's arguments and a one-line description; defaults scale with the preset."""
    n, ffn, h = config.num_hidden_layers, config.intermediate_size, config.hidden_size
    q, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    depth = args.depth if args.depth is not None else 4
    ffn_new = args.ffn or (3 * ffn) // 2
    h_new = args.hidden or -(-(5 * h) // 4 // 16) * 16  # x1.25, rounded up to a multiple of 16
    q_new = args.heads or q + 4
    # kv heads stay, unless q_new is not a multiple of them: then the fewest that divide q_new
    # while every kv head still serves at least as many query heads as before.
    kv_new = next((k for k in range(kv, q_new + 1) if q_new % k == 0 and q_new // k >= q // kv), None)
    if kv_new is None:
        raise SystemExit(f"--heads {q_new}: no kv-head count >= {kv} divides it with groups of >= {q // kv}")
    return {
        "depth": {"args": {"num_layers": depth},
                  "label": f"+{depth} layers at the middle ({n} -> {n + depth})"},
        "ffn": {"args": {"intermediate_size": ffn_new},
                "label": f"FFN {ffn} -> {ffn_new} (x{ffn_new / ffn:.3g}), all layers"},
        "heads": {"args": {"num_attention_heads": q_new, "num_key_value_heads": kv_new},
                  "label": f"heads {q}/{kv} kv -> {q_new}/{kv_new} kv, head_dim {hd}"},
        "hidden": {"args": {"hidden_size": h_new}, "label": f"hidden {h} -> {h_new}"},
    }


def grow(model: ArborForCausalLM, op: str, kwargs: dict[str, Any], optimizer) -> None:
    method = {"depth": model.grow_depth, "ffn": model.grow_width, "heads": model.grow_heads,
              "hidden": model.grow_hidden}[op]
    method(**kwargs, optimizer=optimizer)


def build_model(config: ArborConfig, args: argparse.Namespace) -> ArborForCausalLM:
    torch.manual_seed(args.seed)
    model = ArborForCausalLM._from_config(copy.deepcopy(config))  # growth edits the model's config
    return model.to(args.device, DTYPES[args.dtype]).train()


def make_train_step(model, batch: torch.Tensor, lr: float):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return optimizer, step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- measurements
class Bench:
    def __init__(self, args: argparse.Namespace, config: ArborConfig) -> None:
        self.args, self.config = args, config
        g = torch.Generator().manual_seed(args.seed + 1)
        self.batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        if not self.args.quiet:
            print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", flush=True)

    def fresh(self, with_optimizer: bool):
        """A new model of the preset and, when asked, an AdamW that has taken one step on it."""
        gc.collect()  # the previous model's memory goes first
        model = build_model(self.config, self.args)
        if not with_optimizer:
            return model, None
        optimizer, step = make_train_step(model, self.batch, self.args.lr)
        step()
        return model, optimizer

    def train_step(self) -> dict[str, Any]:
        self.log(f"train step: building the model, {self.args.warmup} warm-up + {self.args.steps} timed steps "
                 f"of {self.args.batch}x{self.args.seq} tokens")
        model = build_model(self.config, self.args)
        _, step = make_train_step(model, self.batch, self.args.lr)
        for _ in range(self.args.warmup):
            step()
        times = []
        for i in range(self.args.steps):
            synchronize(self.args.device)
            start = time.perf_counter()
            step()
            synchronize(self.args.device)
            times.append(time.perf_counter() - start)
            self.log(f"train step {i + 1}/{self.args.steps}: {times[-1] * 1e3:.0f} ms")
        return {"seconds": times, "median_seconds": statistics.median(times),
                "batch": self.args.batch, "seq": self.args.seq, "load_average": os.getloadavg()[0]}

    def time_growth(self, op: str, kwargs: dict[str, Any], with_optimizer: bool) -> list[float]:
        times = []
        for _ in range(self.args.repeats):
            model, optimizer = self.fresh(with_optimizer)
            synchronize(self.args.device)
            start = time.perf_counter()
            grow(model, op, kwargs, optimizer)
            synchronize(self.args.device)
            times.append(time.perf_counter() - start)
            del model, optimizer
        return times

    def memory_growth(self, op: str, kwargs: dict[str, Any], with_optimizer: bool) -> dict[str, Any]:
        args = self.args
        model, optimizer = self.fresh(with_optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        elem = next(model.parameters()).element_size()
        numel_before = sum(p.numel() for p in model.parameters())
        state_before = storage_bytes(optimizer_tensors(optimizer, names).values())
        old = {**{n: p for n, p in model.named_parameters()}, **{n: b for n, b in model.named_buffers()},
               **{n + ".grad": p.grad for n, p in model.named_parameters() if p.grad is not None},
               **optimizer_tensors(optimizer, names)}
        gc.collect()
        cuda = args.device.startswith("cuda")
        if cuda:
            synchronize(args.device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        tracker = LiveStorageTracker()
        tracker.watch(old)
        del old
        profiler = nullcontext()
        if args.allocator_check and not cuda:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with profiler as prof, tracker:
            grow(model, op, kwargs, optimizer)
        result: dict[str, Any] = {}
        if cuda:
            synchronize(args.device)
            result["allocator_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            result["allocator_end_extra_bytes"] = torch.cuda.memory_allocated() - base
        elif prof is not None:
            result["allocator_born_peak_bytes"] = allocator_born_peak(prof)
        numel_after = sum(p.numel() for p in model.parameters())
        names = {id(p): n for n, p in model.named_parameters()}
        expected = count_parameters(model.config)
        if numel_after != expected:
            raise RuntimeError(f"{op}: the grown model has {numel_after} parameters, its config says {expected}")
        new_params = (numel_after - numel_before) * elem
        new_state = storage_bytes(optimizer_tensors(optimizer, names).values()) - state_before
        result.update({
            "new_parameters": numel_after - numel_before,
            "new_parameter_bytes": new_params,
            "new_optimizer_state_bytes": new_state,
            "new_bytes": new_params + new_state,
            "tracker_peak_extra_bytes": tracker.peak,
            "tracker_end_extra_bytes": tracker.current,
            "tracker_born_peak_bytes": tracker.born_peak,
            "at_peak": {k: v for k, v in sorted(tracker.at_peak.items(), key=lambda kv: -abs(kv[1])) if v},
            "held_past_peak": tracker.held_past_peak(),
            "config_after": {k: getattr(model.config, k) for k in (
                "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim")},
        })
        result["peak_extra_bytes"] = result["allocator_peak_extra_bytes"] if cuda else tracker.peak
        return result

    def operator(self, op: str, target: dict[str, Any], with_optimizer: bool, step_seconds: float) -> dict[str, Any]:
        mode = "with AdamW state" if with_optimizer else "no optimizer"
        self.log(f"{op}: {target['label']}, {mode}: timing ({self.args.repeats} fresh model(s))")
        times = self.time_growth(op, target["args"], with_optimizer)
        load = os.getloadavg()[0]  # other processes slow timed runs down; say so next to the time
        self.log(f"{op}, {mode}: {statistics.median(times) * 1e3:.0f} ms (load average {load:.1f}); "
                 "measuring memory on a fresh model")
        run = {"seconds": times, "median_seconds": statistics.median(times), "load_average": load}
        run.update(self.memory_growth(op, target["args"], with_optimizer))
        run["ratio_to_train_step"] = run["median_seconds"] / step_seconds
        run["peak_to_new"] = run["peak_extra_bytes"] / run["new_bytes"] if run["new_bytes"] > 0 else float("inf")
        run["time_pass"] = run["ratio_to_train_step"] < TIME_TARGET
        run["memory_pass"] = run["peak_to_new"] <= MEMORY_TARGET
        self.log(f"{op}, {mode}: peak extra {run['peak_extra_bytes'] / MB:.1f} MB for "
                 f"{run['new_bytes'] / MB:.1f} MB added ({run['peak_to_new']:.2f}x)")
        return run


def warm_up(args: argparse.Namespace) -> None:
    """Every operator once on a tiny model: plugin loading and first-call costs stay out of the timings."""
    tiny = ArborConfig.from_preset("tiny")
    for op, target in growth_targets(tiny, argparse.Namespace(depth=1, ffn=None, heads=None, hidden=None)).items():
        model = ArborForCausalLM._from_config(tiny).to(args.device, DTYPES[args.dtype])
        optimizer, step = make_train_step(model, torch.zeros(1, 4, dtype=torch.long, device=args.device), args.lr)
        step()
        grow(model, op, target["args"], optimizer)
        with LiveStorageTracker():
            torch.empty(1)


# ----------------------------------------------------------------------------- report
def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": args.device,
           "load_average_before": os.getloadavg()}  # other processes on the machine skew timings
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def print_table(results: dict[str, Any], step_seconds: float) -> None:
    print(f"\none training step: {step_seconds * 1e3:.0f} ms; targets: time < {TIME_TARGET:g}x a training step, "
          f"peak extra memory <= {MEMORY_TARGET:g}x the bytes added")
    head = (f"{'operator':<8} {'optimizer':<9} {'time ms':>9} {'/ step':>7} {'new params':>11} "
            f"{'added MB':>9} {'peak MB':>9} {'peak/added':>10}  {'time':<4}  {'memory':<6}")
    print(head)
    print("-" * len(head))
    for op, r in results.items():
        for mode, run in r["runs"].items():
            print(f"{op:<8} {mode:<9} {run['median_seconds'] * 1e3:>9.0f} {run['ratio_to_train_step']:>6.3f}x "
                  f"{run['new_parameters'] / 1e6:>10.2f}M {run['new_bytes'] / MB:>9.1f} "
                  f"{run['peak_extra_bytes'] / MB:>9.1f} {run['peak_to_new']:>9.2f}x  "
                  f"{'PASS' if run['time_pass'] else 'FAIL':<4}  {'PASS' if run['memory_pass'] else 'FAIL':<6}")
    print()
    for op, r in results.items():
        print(f"{op}: {r['label']}")
    for op, r in results.items():
        for mode, run in r["runs"].items():
            if run["memory_pass"]:
                continue
            new = ", ".join(f"{k[5:]} {v / MB:.1f}" for k, v in run["at_peak"].items() if k.startswith("new: "))
            freed = sum(v for k, v in run["at_peak"].items() if k.startswith("freed: "))
            late = ", ".join(f"{k} {v / MB:.1f}" for k, v in list(run["held_past_peak"].items())[:4])
            print(f"{op}/{mode} at its peak (MB): new storages by creating op: {new}; old storages freed "
                  f"by then: {-freed / MB:.1f}; old storages still alive then, freed later: {late or 'none'}")
    checks = [(op, mode, run) for op, r in results.items() for mode, run in r["runs"].items()
              if run.get("allocator_born_peak_bytes")]
    if checks:
        worst = max(abs(run["tracker_born_peak_bytes"] / run["allocator_born_peak_bytes"] - 1) for *_, run in checks)
        print(f"\nallocator check: peak of bytes allocated in the call (frees of older blocks ignored), tracker vs "
              f"profiler, MB (largest difference {100 * worst:.2f} %): "
              + "; ".join(f"{op}/{mode} {run['tracker_born_peak_bytes'] / MB:.2f} vs "
                          f"{run['allocator_born_peak_bytes'] / MB:.2f}" for op, mode, run in checks))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time and peak extra memory of each growth operator (depth, FFN, heads, hidden), each on a "
        "fresh model, with and without an AdamW optimizer carried over, against one training step of the same "
        "model measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="arbor-500m-1b", choices=list(PRESETS), help="model sizes")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=1, help="training-step batch size")
    p.add_argument("--seq", type=int, default=256, help="training-step sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (median taken)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--repeats", type=int, default=1, help="timed growth calls per operator, each on a fresh model")
    p.add_argument("--ops", default=",".join(OPERATORS), help="comma-separated subset of " + ", ".join(OPERATORS))
    p.add_argument("--depth", type=int, default=None, help="layers added (default 4)")
    p.add_argument("--ffn", type=int, default=None, help="new FFN width (default 1.5x)")
    p.add_argument("--heads", type=int, default=None, help="new query-head count (default +4)")
    p.add_argument("--hidden", type=int, default=None, help="new hidden size (default 1.25x, multiple of 16)")
    p.add_argument("--allocator-check", action="store_true",
                   help="CPU: also record allocations with the PyTorch profiler and compare with the tracker")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the environment here")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(args.ops) - set(OPERATORS)
    if unknown or not args.ops:
        p.error(f"--ops: unknown {', '.join(sorted(unknown)) or '(empty)'}; choose from {', '.join(OPERATORS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    for name in ("batch", "seq", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what ``--json`` writes."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    targets = growth_targets(config, args)
    env = environment(args)
    n_params = count_parameters(config)
    bench = Bench(args, config)
    if not args.quiet:
        print(
            f"growth operators | preset {args.preset}: hidden {config.hidden_size}, layers {config.num_hidden_layers}, "
            f"heads {config.num_attention_heads}/{config.num_key_value_heads} kv (head_dim {config.head_dim}), "
            f"ffn {config.intermediate_size}, vocab {config.vocab_size}, tied {config.tie_word_embeddings}, "
            f"{n_params / 1e6:.1f}M params\n"
            f"{args.device} {args.dtype} | train step {args.batch}x{args.seq} tokens, AdamW, median of {args.steps} | "
            f"growth: {args.repeats} timed call(s) + 1 memory call per operator and mode, each on a fresh model\n"
            f"{env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
            f"transformers {env['transformers']}" + (f", {env['gpu']}" if "gpu" in env else "")
            + f"; load average {env['load_average_before'][0]:.1f} on {env['cpu_count']} cores",
            flush=True,
        )
    warm_up(args)
    gc.freeze()  # the objects alive now are never garbage: keeps each gc.collect() short
    try:
        train = bench.train_step()
        results: dict[str, Any] = {}
        for op in args.ops:
            runs = {mode: bench.operator(op, targets[op], mode == "adamw", train["median_seconds"])
                    for mode in ("none", "adamw")}
            results[op] = {"label": targets[op]["label"], "args": targets[op]["args"], "runs": runs}
    finally:
        gc.unfreeze()
    env["load_average_after"] = os.getloadavg()
    elapsed = time.perf_counter() - bench.started
    if not args.quiet:
        print_table(results, train["median_seconds"])
        print(f"\ntotal {elapsed:.0f} s; load average {env['load_average_after'][0]:.1f} at the end")
    payload = {
        "args": vars(args),
        "config": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")},
        "parameters": n_params,
        "environment": env,
        "targets": {"time_ratio_below": TIME_TARGET, "peak_to_new_at_most": MEMORY_TARGET},
        "train_step": train,
        "results": results,
        "elapsed_seconds": elapsed,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        if not args.quiet:
            print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
    sys.exit(0)
