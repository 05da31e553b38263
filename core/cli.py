"""The ``arbor`` command line: one program, one subcommand per task.

A subcommand is a function ``run(args) -> int`` plus a function that adds its
arguments, registered with :func:`command`; adding ``arbor train`` later means
writing those two and nothing else. Errors the user can fix (a bad name, a
bad file) print one ``arbor: error: ...`` line and exit with status 2; only
bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from arbor_plugins import ComponentConflictError, UnknownComponentError

PROG = "arbor"
USAGE_ERROR = 2


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Subcommands by name, in the order ``arbor --help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register the decorated ``run(args) -> int`` as ``arbor <name>``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(help, add_arguments, run)
        return run

    return register


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, like every other arbor error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("arbor-lm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Grow transformer language models while they train.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _parser=p)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a stray argument is reported by the subcommand it was given to.

    Plain argparse reports it from the top-level parser, whose ``--help`` does
    not describe the subcommand's options.
    """
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Plain left-aligned columns; no dependency for something this small."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
    from arbor.plugins import get_registry, plugin_infos
    from arbor.plugins_toml import load_plugins_toml

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
    print(_table(rows, ["plugin", "version", "hooks", "components"]))
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
            if kind == "attention_backend":
                ok, reason = component.is_available()
                line += "" if ok else f"  [not available here: {reason}]"
            print(line)
    return 0


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


@command("presets", "List the model presets with their sizes and exact parameter counts.", _presets_arguments)
def presets_command(args: argparse.Namespace) -> int:
    from arbor.config import PRESETS, ArborConfig
    from arbor.modeling import count_parameters

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
            "parameters": count_parameters(config),
        })
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    header = ["preset", "layers", "hidden", "heads", "kv heads", "ffn", "vocab", "positions", "parameters"]
    rows = [
        [*(str(v) for k, v in r.items() if k != "parameters"), f"{r['parameters']:,} ({_human(r['parameters'])})"]
        for r in records
    ]
    print(_table(rows, header))
    return 0


# ------------------------------------------------------------------- export
EXPORT_FORMATS = ("llama",)
#: Tokenizer files a checkpoint directory may hold; copied next to the export as they are.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="an arbor checkpoint directory (save_pretrained)")
    p.add_argument("out", metavar="OUT", help="directory to write the exported checkpoint to")
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"target format: {', '.join(EXPORT_FORMATS)}")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default: the checkpoint's); checked in float32 first")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="largest allowed logit difference between arbor and the reloaded export (default: 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")


def _checkpoint_config(path: str) -> dict:
    """The checkpoint's config.json, after checking that it is an arbor checkpoint."""
    directory = os.path.abspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path} is not an arbor checkpoint: it has no config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not an arbor checkpoint: config.json cannot be read ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "arbor":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{path} is not an arbor checkpoint: config.json has model_type={found!r}, expected 'arbor'")
    return config


@command("export", "Export an arbor checkpoint as a plain Hugging Face Llama checkpoint, verified.",
         _export_arguments)
def export_command(args: argparse.Namespace) -> int:
    if args.to not in EXPORT_FORMATS:
        raise ValueError(f"--to {args.to!r} is not a known format; allowed: {', '.join(EXPORT_FORMATS)}")
    raw = _checkpoint_config(args.checkpoint)
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise ValueError(f"OUT {args.out} is the checkpoint itself; choose another directory")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.overwrite:
        raise ValueError(f"OUT {args.out} exists and is not empty; pass --overwrite to replace it")
    import shutil

    import torch
    from transformers.utils import logging as hf_logging

    from arbor.export import to_llama
    from arbor.modeling import ArborForCausalLM

    hf_logging.disable_progress_bar()  # one line per phase below instead of transformers' bars on stderr
    saved = raw.get("dtype", raw.get("torch_dtype"))
    dtype = args.dtype or (saved if saved in ("float32", "bfloat16", "float16") else "float32")
    print(f"loading {args.checkpoint}")
    try:  # float32 whatever was saved: the export is checked in float32, then cast
        model = ArborForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    except OSError as exc:
        raise ValueError(f"cannot load {args.checkpoint}: {str(exc).strip().splitlines()[0]}") from None
    report = to_llama(model, args.out, atol=args.atol, dtype=dtype, overwrite=args.overwrite,
                      progress=lambda message: print(f"  {message}", flush=True))
    copied = []
    for name in TOKENIZER_FILES:
        source = os.path.join(args.checkpoint, name)
        if os.path.isfile(source):
            shutil.copy2(source, report.out_dir / name)
            copied.append(name)
    for line in report.lines():
        print(line)
    print(f"tokenizer: copied {', '.join(copied)}" if copied else f"tokenizer: none found in {args.checkpoint}")
    if "tokenizer_config.json" in copied and '"auto_map"' in (report.out_dir / "tokenizer_config.json").read_text():
        print("note: tokenizer_config.json has an auto_map; that tokenizer needs its own code to load")
    return 0


# The commands on runs and checkpoints live in their own module, to keep this one short.
from arbor import cli_run, cli_train  # noqa: E402,F401 - register train, generate, grow, plot

# --------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the ``arbor`` program; returns the exit status (the console script exits with it)."""
    from arbor.plugins import PluginError, PluginLoadError
    from arbor.plugins_toml import PluginsConfigError
    from arbor.train import TrainingStopped

    args = parse_args(argv)
    try:
        return args._run(args)
    except BrokenPipeError:  # `arbor presets | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0
    except (
        PluginsConfigError,
        PluginLoadError,
        ComponentConflictError,
        UnknownComponentError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingStopped as exc:  # the run failed, not its command line: exit 1, still one line
        print(f"{PROG}: training stopped: {exc}", file=sys.stderr)
        return 1
    except PluginError as exc:  # someone else's code failed: name it, without arbor's traceback
        print(f"{PROG}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run as a script this module is ``__main__``, and the commands above registered themselves on
    # the importable ``arbor.cli``; that one holds the full table.
    from arbor.cli import main as _main

    sys.exit(_main())
