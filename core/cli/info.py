"""``arbor plugins``, ``arbor presets`` and ``arbor export``: what is installed, what the presets
are, and a checkpoint turned into a plain Llama one."""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers.utils import logging as hf_logging

from arbor.cli.common import TOKENIZER_FILES, check_output, checkpoint_config, command, table, writing
from arbor.growth.export import to_llama
from arbor.growth.growable import ArborForCausalLM
from arbor.model.cards import CardFigure, card_figures
from arbor.model.config import PRESETS, ArborConfig
from arbor.model.modeling import count_parameters
from arbor.plugins import get_registry, plugin_infos
from arbor.plugins.selection import load_plugins_toml


# ------------------------------------------------------------------ plugins
def _plugins_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the plugin list as JSON")
    p.add_argument(
        "--plugins",
        metavar="PATH",
        help="a plugins.toml to check and show (default: ./plugins.toml if it exists)",
    )


@command("plugins", "List installed plugins, their hooks and components; check plugins.toml.", _plugins_arguments)
def plugins_command(args: argparse.Namespace) -> int:
    infos = plugin_infos()
    selection = load_plugins_toml(args.plugins)  # checked in both modes: a bad file exits 2
    if args.json:
        # Always the bare list, whatever the working directory holds, so scripts can rely on its shape.
        print(json.dumps(infos, indent=2))
        return 0

    rows = []
    for info in infos:
        components = ", ".join(f"{c['kind']}:{c['name']}" for c in info["components"]) or "-"
        hooks = ", ".join(info["hooks"]) or "-"
        name = info["distribution"] or info["module"]
        if info["entry_point"]:
            name = f"{name} ({info['entry_point']})"
        rows.append([name, info["version"] or "-", hooks, components if "error" not in info else "FAILED"])
    print(table(rows, ["plugin", "version", "hooks", "components"]))
    for info in infos:
        if "error" in info:
            print(f"\nerror: {info['error']}")

    if selection:
        print(f"\n{selection.path}: ok")
        registry = get_registry()
        for kind, choice in selection.as_dict().items():
            settings = ", ".join(f"{k}={v!r}" for k, v in choice["settings"].items())
            line = f"  {kind} = {choice['name']}" + (f" ({settings})" if settings else "")
            component = registry.get(kind, choice["name"])
            described = describe(component, choice["settings"])
            line += f": {described}" if described else ""
            if kind == "attention_backend":
                ok, reason = component.is_available()
                line += "" if ok else f"  [not available here: {reason}]"
            print(line)
    return 0


def describe(component, settings: dict | None) -> str:
    """The component's one line for these settings (``describe``, else ``description``); a
    component whose ``describe`` fails says so instead of stopping the listing."""
    if not callable(getattr(component, "describe", None)):  # one that does not subclass arbor_plugins.Component
        return getattr(component, "description", "")
    try:
        return component.describe(component.validate_settings(settings))
    except Exception as exc:  # plugin code: one line, not a traceback
        return f"{getattr(component, 'description', '')} [describe() failed: {type(exc).__name__}: {exc}]".lstrip()


# ------------------------------------------------------------------ presets
def _presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="PRESET", help="only these presets (default: all)")
    p.add_argument("--json", action="store_true", help="print the presets as JSON")


def _per_layer(values: list[int]) -> int | str:
    """One number for uniform layers, ``min-max`` for grown, uneven ones."""
    return values[0] if len(set(values)) == 1 else f"{min(values)}-{max(values)}"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _card_record(figure: CardFigure) -> dict:
    """arbor's count for the model a card figure describes, beside the card's, and the difference."""
    config = ArborConfig.from_preset(figure.preset, **figure.overrides)
    parameters = count_parameters(config)
    frozen = {"none": 0, "matrix": config.vocab_size * config.hidden_size,
              "bits": config.vocab_size * max(1, (config.vocab_size - 1).bit_length())}[figure.frozen_counted]
    compared = parameters + frozen
    difference = compared - figure.parameters
    return {
        "card": figure.card,
        "stated": figure.stated,
        "kind": figure.kind,
        "overrides": figure.overrides,
        "parameters": parameters,
        "frozen_counted": frozen,
        "compared": compared,
        "card_parameters": figure.parameters,
        "difference": difference,
        "relative": difference / figure.parameters,
        "within_rounding": figure.kind == "count" and abs(difference) <= figure.resolution,
        "why": figure.why,
    }


def _card_lines(name: str, card: dict) -> list[str]:
    settings = "".join(f", {k}={v}" for k, v in card["overrides"].items())
    arbor = f"{card['parameters']:,} parameters"
    if card["frozen_counted"]:
        arbor += f" + {card['frozen_counted']:,} in the frozen table the card counts = {card['compared']:,}"
    arbor += f" ({_human(card['compared'])})"
    off = f"{card['difference']:+,} ({card['relative']:+.2%})"
    if card["kind"] == "name":
        verdict = f"{off}; {card['stated']} is the model's name, not a count"
    elif card["within_rounding"]:
        verdict = f"{off}, within the card's rounding: matches"
    else:
        verdict = f"{off}, beyond the card's rounding"
    return [f"{name}{settings} ~ {card['card']}: {card['stated']}", f"  arbor: {arbor}; {verdict}",
            f"  why: {card['why']}"]


@command("presets", "List the model presets with their sizes and exact parameter counts, against the source "
                    "models' cards.", _presets_arguments)
def presets_command(args: argparse.Namespace) -> int:
    unknown = [n for n in args.names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset {unknown[0]!r}; valid presets: {', '.join(PRESETS)}")
    records = []
    for name in args.names or list(PRESETS):
        config = ArborConfig.from_preset(name)
        records.append({
            "name": name,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "heads": _per_layer(config.layer_num_attention_heads),
            "kv_heads": _per_layer(config.layer_num_key_value_heads),
            "ffn": _per_layer(config.layer_intermediate_sizes),
            "vocab": config.vocab_size,
            "positions": config.max_position_embeddings,
            "substrate": config.substrate,
            "parameters": count_parameters(config),
            "cards": [_card_record(figure) for figure in card_figures(name)],
        })
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    header = ["preset", "layers", "hidden", "heads", "kv heads", "ffn", "vocab", "positions", "substrate",
              "parameters"]
    keys = ["name", "layers", "hidden_size", "heads", "kv_heads", "ffn", "vocab", "positions", "substrate"]
    rows = [[*(str(r[k]) for k in keys), f"{r['parameters']:,} ({_human(r['parameters'])})"] for r in records]
    print(table(rows, header))
    registry = get_registry()
    for substrate in dict.fromkeys(r["substrate"] for r in records):
        component = registry.get("substrate", substrate)
        if getattr(component, "frozen", False):  # what a frozen substrate is built from on this machine
            print(f"\nsubstrate {substrate}: {describe(component, None)}")
    cards = [(r["name"], card) for r in records for card in r["cards"]]
    if cards:
        print("\nAgainst the source cards (a card counts its frozen embedding table as parameters; arbor keeps "
              "it as a buffer, so that table is added before comparing):")
        for name, card in cards:
            print("\n".join(_card_lines(name, card)))
    return 0


# ------------------------------------------------------------------- export
EXPORT_FORMATS = ("llama",)
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="an arbor checkpoint directory (save_pretrained)")
    p.add_argument("out", metavar="OUT", help="directory to write the exported checkpoint to")
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"target format: {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default: the checkpoint's); checked in float32 first")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="largest allowed logit difference between arbor and the reloaded export (default: 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")


@command("export", "Export an arbor checkpoint as a plain Hugging Face Llama checkpoint, verified.",
         _export_arguments)
def export_command(args: argparse.Namespace) -> int:
    if args.to not in EXPORT_FORMATS:
        raise ValueError(f"--to {args.to!r} is not a known format; allowed: {', '.join(EXPORT_FORMATS)}")
    raw = checkpoint_config(args.checkpoint)
    check_output(args.out, args.checkpoint, args.overwrite, f"OUT {args.out}")
    hf_logging.disable_progress_bar()  # one line per phase below instead of transformers' bars on stderr
    saved = raw.get("dtype", raw.get("torch_dtype"))
    dtype = args.dtype or (saved if saved in ("float32", "bfloat16", "float16") else "float32")
    print(f"loading {args.checkpoint}")
    try:  # float32 whatever was saved: the export is checked in float32, then cast
        model = ArborForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    except OSError as exc:
        raise ValueError(f"cannot load {args.checkpoint}: {str(exc).strip().splitlines()[0]}") from None
    # The tokenizer goes in with the weights, before the directory gets its name: a failed copy
    # leaves no export without its tokenizer.
    tokenizer = {name: os.path.join(args.checkpoint, name) for name in TOKENIZER_FILES
                 if os.path.isfile(os.path.join(args.checkpoint, name))}
    with writing(args.out, args.checkpoint):
        report = to_llama(model, args.out, atol=args.atol, dtype=dtype, overwrite=args.overwrite,
                          extra_files=tokenizer, progress=lambda message: print(f"  {message}", flush=True))
    copied = list(tokenizer)
    for line in report.lines():
        print(line)
    print(f"tokenizer: copied {', '.join(copied)}" if copied else f"tokenizer: none found in {args.checkpoint}")
    if "tokenizer_config.json" in copied and '"auto_map"' in (report.out_dir / "tokenizer_config.json").read_text():
        print("note: tokenizer_config.json has an auto_map; that tokenizer needs its own code to load")
    return 0
