"""The ``arbor`` commands that work on runs and checkpoints: ``generate``, ``grow``, ``plot``
(and ``train``, in `arbor.cli.train`). Registered into `arbor.cli.common.COMMANDS` on import."""

from __future__ import annotations

import argparse
import math
import os
import shutil

import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from arbor.cli.common import TOKENIZER_FILES, check_output, checkpoint_config, command, writing
from arbor.growth.growable import ArborForCausalLM
from arbor.model.checkpoint import replace_directory, sibling_directory
from arbor.training.plot import plot_run
from arbor.training.tokenizer import encode
from arbor_plugins import DEFAULTS


def _load(checkpoint: str):
    """Model (float32, eval) and tokenizer (or None) of an arbor checkpoint."""
    checkpoint_config(checkpoint)
    hf_logging.disable_progress_bar()
    try:
        model = ArborForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    except OSError as exc:
        raise ValueError(f"cannot load {checkpoint}: {str(exc).strip().splitlines()[0]}") from None
    tokenizer = None
    if os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return model, tokenizer


# ------------------------------------------------------------------ generate
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="an arbor checkpoint directory with its tokenizer")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=60, help="tokens to generate (default: 60)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--parse-special", action="store_true",
                   help="read special-token text in the prompt (<|bos|>, <|eos|>) as those tokens; "
                        "by default it is plain text")


@command("generate", "Continue a prompt with a trained checkpoint.", _generate_arguments)
def generate_command(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is invalid: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan compares false to everything
        raise ValueError(f"--temperature {args.temperature} is invalid: must be a finite number >= 0")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k} is invalid: must be >= 0 (0: all tokens)")
    model, tokenizer = _load(args.checkpoint)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json; generate needs the run's tokenizer")
    # The checkpoint's max_length is its context; --max-new-tokens decides here, and transformers
    # would warn on every call that both are set.
    model.generation_config.max_length = GenerationConfig().max_length
    torch.manual_seed(args.seed)
    if not args.prompt:
        raise ValueError("the prompt is empty; give some text to continue")
    ids = encode(tokenizer, args.prompt, parse_special=args.parse_special, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization; give some text")
    # Past its positions the model runs on RoPE angles it never trained on: the text degrades
    # without any error, so the limit is enforced here rather than discovered in the output.
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} is "
            f"{ids.shape[1] + args.max_new_tokens} positions, past the model's max_position_embeddings={limit}; "
            f"allowed: prompt tokens + --max-new-tokens <= {limit}"
        )
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or None) \
        if args.temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


# ---------------------------------------------------------------------- grow
def _grow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="an arbor checkpoint directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--depth", type=int, metavar="K", help="insert K layers")
    what.add_argument("--width", type=int, metavar="N", help="FFN width of every layer to N")
    what.add_argument("--heads", type=int, metavar="N", help="query heads of every layer to N")
    what.add_argument("--hidden", type=int, metavar="N", help="hidden size (d_model) to N")
    p.add_argument("--kv-heads", type=int, metavar="N", help="with --heads: kv heads to N")
    p.add_argument("--init", default=DEFAULTS["init_scheme"],
                   help=f"init scheme (default: {DEFAULTS['init_scheme']}; 'arbor plugins' lists them)")
    p.add_argument("--policy", help="with --depth: insertion policy (default: the middle)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds what the step draws at random (new layers' attention, split noise); default 0")
    p.add_argument("--out", metavar="OUT", help="where to write the grown checkpoint (default: CKPT-grown)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


@command("grow", "Grow a checkpoint offline (depth, FFN width, heads or hidden size) and save it.",
         _grow_arguments)
def grow_command(args: argparse.Namespace) -> int:
    out = args.out or args.checkpoint.rstrip("/\\") + "-grown"
    check_output(out, args.checkpoint, args.overwrite, f"--out {out}")
    if args.kv_heads is not None and args.heads is None:
        raise ValueError("--kv-heads only applies together with --heads")
    if args.policy is not None and args.depth is None:
        raise ValueError("--policy only applies together with --depth")
    if args.init == "masked":
        raise ValueError("--init masked ramps new parts in during training, and a checkpoint cannot hold the "
                         "ramp; offline, use zero or split (exact) instead")
    model, _ = _load(args.checkpoint)
    probe = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(args.seed)  # the same command grows the same checkpoint the same way
    if args.depth is not None:
        event = model.grow_depth(args.depth, policy=args.policy, init=args.init)
    elif args.width is not None:
        event = model.grow_width(args.width, init=args.init)
    elif args.heads is not None:
        event = model.grow_heads(args.heads, args.kv_heads, init=args.init)
    else:
        event = model.grow_hidden(args.hidden, init=args.init)
    with torch.no_grad():
        diff = (model(probe).logits - before).abs().max().item()
    with writing(out, args.checkpoint):
        _save_grown(model, args.checkpoint, out, args.overwrite)
    grown = sum(p.numel() for p in model.parameters())
    exact = "exact" if event.exact else "not exact"
    print(f"grew {event.axis} with init {event.init!r} ({exact}): {params:,} -> {grown:,} parameters, "
          f"{model.config.num_hidden_layers} layers; max logit change on a probe batch {diff:.2g}")
    print(f"wrote {out}")
    return 0


def _save_grown(model, checkpoint: str, out: str, overwrite: bool) -> None:
    """Save ``model`` with ``checkpoint``'s tokenizer as ``out``: written aside, then renamed, so a
    failure (a full disk) leaves ``out`` as it was; ``out`` is checked again just before it is
    replaced, in case something appeared there while the model grew."""
    tmp = sibling_directory(out, "grow")
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(checkpoint, name)):
                shutil.copy2(os.path.join(checkpoint, name), tmp / name)
        check_output(out, checkpoint, overwrite, f"--out {out}")
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- plot
def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="the --out directory of an 'arbor train' run")
    p.add_argument("--out", metavar="PNG", help="image to write (default: RUN_DIR/training.png)")


@command("plot", "Plot a run: loss against tokens with growth events marked, parameters over time, and "
                 "per-layer utilization when the run's trigger recorded it.", _plot_arguments)
def plot_command(args: argparse.Namespace) -> int:
    print(f"wrote {plot_run(args.run, args.out)}")
    return 0
