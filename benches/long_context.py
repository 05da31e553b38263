"""Memory and speed of long contexts: prefill and generation from 4K to 128K tokens.

For each context length L of ``--lengths`` a fresh child process builds the model
(``ArborConfig.from_preset(--preset)``, by default arbor-500m-1b, with random weights, optionally
narrowed or shortened by ``--scale``/``--layers``/``--hidden``/... while its RoPE, linear x32 to
131,072 positions, stays as it is) and measures:

1. **prefill**: one forward of L random tokens with ``use_cache=True`` into an empty
   ``DynamicCache``, with only the last position through the LM head (``logits_to_keep=1``, as
   ``generate`` does): seconds and tokens/s;
2. **generation**: ``--new-tokens`` greedy decode steps, one token per forward, against the cache
   the prefill left, at positions L, L+1, ... (what ``generate`` does after its prefill): the
   median milliseconds per token (every step's time is in the JSON);
3. **memory**: the KV-cache bytes the ``DynamicCache`` holds after the prefill (and after the
   decode), the bytes of the weights, and the peak memory of the run over what the process held
   once the model was built: ``ru_maxrss`` (peak resident set) on a CPU, ``max_memory_allocated``
   on CUDA.

A length given to ``--decode-only`` skips the prefill (too slow on a CPU at 64K and beyond): every
layer's cache is filled with random keys and values of the right shape (batch 1, KV heads, L,
head_dim) and generation is timed against it at positions L, L+1, ... The speed of a decode step
does not depend on the values in the cache, so this measures generation and the cache's memory at
that context; its row says "prefill not run".

One child per length, so each length's peak is its own. A child that runs past ``--timeout`` or
out of memory is reported as such on its row, and the next length runs. ``--memory-limit`` caps
each child's address space (so a length that does not fit fails inside the child instead of
pressing on the rest of the machine); a length whose weights and analytic KV cache alone exceed it
is not started.

    python benches/long_context.py --device cuda --dtype bfloat16      # GPU: every length, prefill and decode
    python benches/long_context.py --threads 1     # the full model on a CPU: about 7 minutes on 2 cores
    python benches/long_context.py --scale 8 --lengths 4096,16384,32768 --decode-only 65536,131072 --threads 1
                                                   # 24 layers of hidden 128 on a CPU: about 9 minutes
    python benches/long_context.py --quick --out runs/long-context.json   # smoke run (CI): seconds

On a CPU, when neither ``--lengths`` nor ``--decode-only`` is given, only 4K is prefilled (a
prefill of 16K and beyond takes from tens of minutes to hours there) and the longer lengths are
decode-only, with 4 new tokens unless ``--new-tokens`` says otherwise; on CUDA every length is
prefilled. On a CPU a length whose weights and KV cache alone need more than three quarters of
the machine's memory is not started, cap or no cap, instead of pressing the machine into swap.

The figures, the machine they were taken on and the card's table beside them are in
docs/long-context.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from arbor import PRESETS, ArborConfig, ArborForCausalLM, compat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LENGTHS = "4096,16384,32768,65536,131072"
#: A CPU's plan when no length is given: prefill 4K only, decode against a random cache beyond it.
CPU_PLAN = dict(lengths="4096", decode_only="16384,32768,65536,131072", new_tokens=4)
#: On a CPU, a length whose weights and KV cache need more than this share of the machine's memory
#: is not started, even without ``--memory-limit``.
CPU_MEMORY_SHARE = 0.75
#: ``--quick``: a tiny model, short lengths, one decode-only row; options given still win.
QUICK = dict(lengths="64,128", decode_only="96", new_tokens=2, layers=2, hidden=64, heads=2, ffn=128, vocab=512,
             timeout=120.0)
MIB = 2**20


# ----------------------------------------------------------------------------- the model
def build_config(args: argparse.Namespace) -> ArborConfig:
    """The preset, narrowed by ``--scale`` and the explicit sizes; RoPE and context are the preset's.

    ``--scale S`` divides the hidden size, the query and KV head counts and the FFN width by S, so
    head_dim stays the preset's (64 for arbor-500m-1b) and so does the layer count.
    """
    base = ArborConfig.from_preset(args.preset)
    s = args.scale
    hidden = args.hidden or base.hidden_size // s
    heads = args.heads or max(1, base.num_attention_heads // s)
    if args.kv_heads:
        kv_heads = args.kv_heads
    else:  # keep the preset's ratio of query to KV heads
        group = base.num_attention_heads // base.num_key_value_heads
        kv_heads = max(1, heads // group)
    layers = args.layers or base.num_hidden_layers
    overrides: dict[str, Any] = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=args.ffn or max(1, base.intermediate_size // s),
        num_hidden_layers=layers,
        min_layers=min(base.min_layers, layers),
        max_layers=max(base.max_layers or layers, layers),
    )
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
    if hidden != base.hidden_size or heads != base.num_attention_heads:
        overrides["head_dim"] = hidden // heads
    return ArborConfig.from_preset(args.preset, **overrides)


def kv_cache_bytes_expected(config: ArborConfig, length: int, dtype: torch.dtype) -> int:
    """2 (keys and values) x sum over layers of KV heads x head_dim x length x bytes per element."""
    per_token = sum(2 * kv * config.head_dim for kv in config.layer_num_key_value_heads)
    return per_token * length * torch.empty((), dtype=dtype).element_size()


def weights_bytes_expected(config: ArborConfig, dtype: torch.dtype) -> int:
    """The weights' bytes, from the parameter count of a model built on the meta device."""
    with torch.device("meta"):
        model = ArborForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def cache_bytes(cache: DynamicCache) -> int:
    """The bytes of the key and value tensors the cache holds, every layer."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def random_cache(config: ArborConfig, length: int, dtype: torch.dtype, device: str, seed: int) -> DynamicCache:
    """A ``DynamicCache`` holding ``length`` positions of random keys and values in every layer."""
    cache = DynamicCache(config=config)
    g = torch.Generator(device=device).manual_seed(seed)
    for i, kv in enumerate(config.layer_num_key_value_heads):
        shape = (1, kv, length, config.head_dim)
        keys = torch.randn(shape, generator=g, device=device, dtype=dtype)
        values = torch.randn(shape, generator=g, device=device, dtype=dtype)
        cache.update(keys, values, i)
        del keys, values
    return cache


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill(model: ArborForCausalLM, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One forward of the whole prompt into ``cache``; the greedy next token."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{compat.CACHE_KWARG: cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def decode(
    model: ArborForCausalLM, cache: DynamicCache, token: torch.Tensor, steps: int, device: str
) -> tuple[list[float], list[int], list[int]]:
    """``steps`` greedy steps of one token each against ``cache``, at the positions that follow it.

    Returns the seconds of each step, the position each step's token was given, and the tokens
    chosen (the first is the one after ``token``).
    """
    start = cache.get_seq_length()
    times, positions, chosen = [], [], []
    for i in range(steps):
        position = torch.tensor([[start + i]], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        out = model(input_ids=token, position_ids=position, use_cache=True, **{compat.CACHE_KWARG: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        positions.append(start + i)
        chosen.append(int(token))
    return times, positions, chosen


# ----------------------------------------------------------------------------- memory
def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the peak so far is the best figure there is
        return _maxrss_bytes()


class Memory:
    """Peak memory of the run over a baseline taken once the model is built."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.source = "torch.cuda.max_memory_allocated" if self.cuda else "ru_maxrss"

    def baseline(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.base_peak = self.base
        else:
            self.base = _rss_bytes()
            self.base_peak = _maxrss_bytes()  # the build's own peak, which a run may stay under

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _maxrss_bytes()

    def over_baseline(self) -> int:
        return max(0, self.peak() - self.base)


# ----------------------------------------------------------------------------- one length (child)
def measure(args: argparse.Namespace, length: int, decode_only: bool) -> dict[str, Any]:
    """Everything measured at one context length, in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = build_config(args)
    memory = Memory(args.device)
    torch.manual_seed(args.seed)
    model = ArborForCausalLM._from_config(config, attn_implementation=args.attn, dtype=dtype)
    model = model.to(args.device).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=g).to(args.device)
    with torch.inference_mode():  # warm-up: kernels and threads started outside the timing
        model(input_ids=ids[:, :16], use_cache=True, logits_to_keep=1)
    memory.baseline()
    row: dict[str, Any] = dict(
        length=length, mode="decode-only" if decode_only else "prefill+decode", status="ok",
        new_tokens=args.new_tokens, weights_bytes=weights, memory_source=memory.source,
        baseline_bytes=memory.base, build_peak_bytes=memory.base_peak,
        kv_cache_bytes_expected=kv_cache_bytes_expected(config, length, dtype),
    )
    if decode_only:
        t0 = time.perf_counter()
        cache = random_cache(config, length, dtype, args.device, args.seed + 1)
        token = ids[:, -1:]
        row.update(prefill_seconds=None, prefill_tokens_per_second=None,
                   cache_fill_seconds=time.perf_counter() - t0)
    else:
        cache = DynamicCache(config=config)
        synchronize(args.device)
        t0 = time.perf_counter()
        token = prefill(model, ids, cache)
        synchronize(args.device)
        seconds = time.perf_counter() - t0
        row.update(prefill_seconds=seconds, prefill_tokens_per_second=length / seconds)
    del ids
    row.update(cache_length_after_prefill=cache.get_seq_length(), kv_cache_bytes=cache_bytes(cache),
               peak_after_prefill_bytes=memory.over_baseline())
    times, positions, tokens = decode(model, cache, token, args.new_tokens, args.device)
    row.update(
        decode_step_seconds=times,
        decode_ms_per_token=1000 * statistics.median(times),
        decode_ms_per_token_mean=1000 * statistics.fmean(times),
        positions=positions, tokens=tokens,
        cache_length_after_decode=cache.get_seq_length(),
        kv_cache_bytes_after_decode=cache_bytes(cache),
        peak_bytes=memory.over_baseline(),
        peak_total_bytes=memory.peak(),
    )
    # On a CPU the run's peak can hide under the build's own (weights converted, say): then the
    # figure above is a lower bound, and the row says so.
    row["peak_is_lower_bound"] = (not memory.cuda) and memory.peak() <= memory.base_peak
    return row


def _oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def child(args: argparse.Namespace, length: int, decode_only: bool, path: str) -> None:
    """The body of a child process: measure one length, write the row as JSON to ``path``."""
    if args.memory_limit and not args.device.startswith("cuda"):
        limit = int(args.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    started = time.perf_counter()
    try:
        row = measure(args, length, decode_only)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the row's status
        gc.collect()
        status = "out of memory" if _oom(exc) else "failed"
        row = dict(length=length, mode="decode-only" if decode_only else "prefill+decode", status=status,
                   message=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
                   traceback=traceback.format_exc(limit=4))
    row["child_seconds"] = time.perf_counter() - started
    with open(path, "w") as f:
        json.dump(row, f)


# ----------------------------------------------------------------------------- the lengths (parent)
def start_method(args: argparse.Namespace) -> str:
    """How children start: forked from this process, which has imported torch but run nothing on it
    (no second import per length), except on CUDA, whose driver does not survive a fork, and where
    ``fork`` does not exist: there a fresh interpreter."""
    if args.start_method != "auto":
        return args.start_method
    forkable = "fork" in multiprocessing.get_all_start_methods()
    return "fork" if forkable and not args.device.startswith("cuda") else "spawn"


def run_length(args: argparse.Namespace, length: int, decode_only: bool, config: ArborConfig) -> dict[str, Any]:
    """Measure one length in a child process; a timeout, a kill or a crash becomes the row's status."""
    mode = "decode-only" if decode_only else "prefill+decode"
    dtype = DTYPES[args.dtype]
    need = weights_bytes_expected(config, dtype) + kv_cache_bytes_expected(config, length + args.new_tokens, dtype)
    if args.fit_limit and need > args.fit_limit * 2**30:
        over = (f"--memory-limit {args.memory_limit:g} GiB" if args.memory_limit else
                f"{args.fit_limit:g} GiB, {CPU_MEMORY_SHARE:.0%} of this machine's memory")
        return dict(length=length, mode=mode, status="too large",
                    message=f"not run: weights and KV cache alone need {need / 2**30:.1f} GiB, over {over}")
    context = multiprocessing.get_context(start_method(args))
    fd, path = tempfile.mkstemp(prefix="long-context-", suffix=".json")
    os.close(fd)
    try:
        process = context.Process(target=child, args=(args, length, decode_only, path))
        started = time.perf_counter()
        process.start()
        process.join(args.timeout)
        if process.is_alive():
            process.kill()
            process.join()
            return dict(length=length, mode=mode, status="timed out",
                        message=f"timed out after {args.timeout:g} s", child_seconds=time.perf_counter() - started)
        with open(path) as f:
            text = f.read()
        if text:
            return json.loads(text)
        code = process.exitcode
        status = "out of memory" if code == -9 else "failed"  # SIGKILL unasked: the kernel's OOM killer
        return dict(length=length, mode=mode, status=status, message=f"the child exited with code {code}",
                    child_seconds=time.perf_counter() - started)
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------- report
def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / MIB:,.0f}" if n >= 10 * MIB else f"{n / MIB:,.1f}"


def format_row(row: dict[str, Any]) -> str:
    length = f"{row['length']:>7,}"
    if row["status"] != "ok":
        message = row.get("message", "")
        if not message.startswith(row["status"]):
            message = f"{row['status']}: {message}"
        return f"{length}  {row['mode']:<15} {message}"
    if row["prefill_seconds"] is None:
        prefill = f"{'prefill not run':>22}"
    else:
        prefill = f"{row['prefill_seconds']:>9.2f} s {row['prefill_tokens_per_second']:>8,.0f}/s"
    peak = _mib(row["peak_bytes"]) + ("+" if row.get("peak_is_lower_bound") else "")
    return (f"{length}  {row['mode']:<15}{prefill}  {row['decode_ms_per_token']:>9.1f}  {peak:>10}  "
            f"{_mib(row['kv_cache_bytes']):>9}  {_mib(row['weights_bytes']):>8}")


HEADER = (f"{'length':>7}  {'mode':<15}{'prefill':>11} {'tokens/s':>10}  {'decode ms':>9}  {'peak MiB':>10}  "
          f"{'KV MiB':>9}  {'weights':>8}")


def describe(config: ArborConfig, args: argparse.Namespace) -> str:
    rope = config.rope_parameters or {}
    return (f"{args.preset}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads}/{config.num_key_value_heads} kv heads x {config.head_dim}, "
            f"ffn {config.intermediate_size}, vocab {config.vocab_size}, RoPE {rope.get('rope_type')} "
            f"x{rope.get('factor', 1):g} to {config.max_position_embeddings:,} positions | {args.device} "
            f"{args.dtype} attn={args.attn} | {args.new_tokens} new tokens")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            env["cpu"] = names[0]
    except OSError:
        pass
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    return env


def parse_lengths(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated integers")
    if any(v < 1 for v in values):
        p.error(f"{flag}: lengths must be >= 1")
    return values


def machine_memory() -> int:
    """Bytes of physical memory (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="arbor-500m-1b", choices=list(PRESETS),
                   help="the arbor preset to build (default: arbor-500m-1b)")
    p.add_argument("--lengths", default=None,
                   help=f"comma-separated context lengths, each prefilled then decoded (default: {DEFAULT_LENGTHS} "
                        f"on CUDA; {CPU_PLAN['lengths']} on a CPU when --decode-only is not given either)")
    p.add_argument("--decode-only", default=None, metavar="L,...",
                   help="comma-separated lengths measured without a prefill: a random KV cache of that length, "
                        f"then --new-tokens decode steps against it (default: none on CUDA; "
                        f"{CPU_PLAN['decode_only']} on a CPU when --lengths is not given either)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps after the prefill, one token each "
                                                                "(default: 16; 4 on a CPU's default plan)")
    p.add_argument("--scale", type=int, default=1,
                   help="divide hidden size, head counts and FFN width by this; head_dim and layers are kept "
                        "(default: 1)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the preset's / --scale)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: the preset's / --scale)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: --heads over the preset's ratio "
                                                              "of query to KV heads)")
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default: the preset's / --scale)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and cache (default: float32)")
    p.add_argument("--attn", default="sdpa", help="transformers attention implementation (default: sdpa)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each child (default: torch's own; on a machine shared with "
                        "other work, fewer threads than cores avoids threads waiting on each other)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one length may take before its child is killed (default: 1800)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="CPU only: cap each child's address space at this many GiB; a length whose weights and "
                        "KV cache alone need more is not started (default: no cap; on a CPU a length whose "
                        f"weights and KV cache need over {CPU_MEMORY_SHARE * 100:.0f} %% of the machine's memory "
                        "is not started either)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and random caches (default: 0)")
    p.add_argument("--start-method", default="auto", choices=["auto", "fork", "spawn"],
                   help="how each length's child process starts (default: auto, fork on a CPU where it exists, "
                        "else spawn)")
    p.add_argument("--out", metavar="PATH", help="write the rows, the config and the environment here as JSON")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds: a 2-layer model at lengths 64 and 128, one decode-only row "
                        "at 96, 2 new tokens")
    args = p.parse_args(argv)
    if args.quick:  # small defaults; options given on the command line still win
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    cpu = not args.device.startswith("cuda")
    if args.lengths is None and args.decode_only is None:
        plan = CPU_PLAN if cpu else dict(lengths=DEFAULT_LENGTHS, decode_only="", new_tokens=16)
        args.lengths, args.decode_only = plan["lengths"], plan["decode_only"]
        args.new_tokens = plan["new_tokens"] if args.new_tokens is None else args.new_tokens
    args.new_tokens = 16 if args.new_tokens is None else args.new_tokens
    if args.memory_limit is not None and args.memory_limit <= 0:
        p.error("--memory-limit must be > 0")
    # The size over which a length is not started: the cap, or on a CPU a share of the machine's memory.
    args.fit_limit = args.memory_limit or (round(CPU_MEMORY_SHARE * machine_memory() / 2**30, 1) if cpu else None)
    args.length_list = parse_lengths(p, "--lengths", args.lengths or "")
    args.decode_only_list = parse_lengths(p, "--decode-only", args.decode_only or "")
    if not args.length_list and not args.decode_only_list:
        p.error("give at least one length (--lengths or --decode-only)")
    for name in ("new_tokens", "scale"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        args.config = build_config(args)
    except (ValueError, TypeError) as exc:
        p.error(f"the model sizes: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = args.config
    started = time.perf_counter()
    print(describe(config, args), flush=True)
    print(HEADER, flush=True)
    rows = []
    plan = [(L, False) for L in args.length_list] + [(L, True) for L in args.decode_only_list]
    for length, decode_only in plan:
        row = run_length(args, length, decode_only, config)
        rows.append(row)
        print(format_row(row), flush=True)
    elapsed = time.perf_counter() - started
    if any(r["status"] == "ok" and r["length"] + args.new_tokens > config.max_position_embeddings for r in rows):
        print(f"note: the last decode steps of some rows run past the {config.max_position_embeddings:,} positions "
              "of the context")
    if any(r.get("peak_is_lower_bound") for r in rows):
        print("+: the run stayed under the peak of building the model; its peak is at least the figure shown")
    print(f"peak: {'ru_maxrss' if args.device == 'cpu' else 'max_memory_allocated'} over the memory held once the "
          f"model was built | decode ms: median per token | total {elapsed:.0f} s")
    if args.out:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "config"},
            "config": {k: getattr(config, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_parameters")},
            "environment": environment(args),
            "rows": rows,
            "elapsed_seconds": elapsed,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
