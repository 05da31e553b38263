"""``arbor train``: train a growing model end to end.

With no arguments it trains on CPython's standard-library source (split into
training and validation by file) with a byte-level BPE tokenizer trained on
it, starts at 2 layers of the ``small`` preset and grows them exactly to 6 on a
schedule (`arbor.training.trainer.DEFAULT_GROWTH`), saves checkpoints, writes
``metrics.jsonl`` and ``training.png``, and prints a sample.

Settings come from, in increasing priority: a recipe (``--recipe``), a config
file (TOML or YAML), ``--set key=value`` (dotted keys reach into tables), and
the explicit flags (``--data``, ``--max-steps``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from arbor.cli.common import USAGE_ERROR, command
from arbor.growth.growable import ArborForCausalLM
from arbor.model.config import ArborConfig
from arbor.plugins import get_registry
from arbor.plugins.selection import apply_rope_scaling, load_plugins_toml
from arbor.training import distributed
from arbor.training.card_config import translate_card_keys
from arbor.training.checkpointing import latest_checkpoint, latest_intact_checkpoint, load_trainer_state
from arbor.training.data import PackedDataset, load_split
from arbor.training.distributed import Ranks
from arbor.training.plot import plot_run
from arbor.training.textfiles import read_utf8
from arbor.training.preflight import check_run, validate_run_settings
from arbor.training.rundir import LOCK, RunLock, check_checkpoint, check_out, check_own, holds_run, write_config
from arbor.training.sharding import check_growth_settings
from arbor.training.tokenizer import load_tokenizer, train_bpe
from arbor.training.trainer import TrainConfig, Trainer, TrainingStopped, truncate_metrics
from arbor_plugins import DEFAULTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Ready-made runs. "default" is what `arbor train` does with no arguments.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # Progressive Growth Transformers: 3 layers with the embeddings, then +3 on top with everything
    # below frozen, twice (3 -> 6 -> 9 layers): pgt-unfrozen-1-9's stages on the tiny preset, whose
    # head is the (frozen) embedding matrix.
    "pgt": {
        "model": {"preset": "tiny", "num_hidden_layers": 3, "max_layers": 9},
        "growth": {"trigger": "schedule", "step": {"axis": "depth", "num_layers": 3, "policy": "top"},
                   "stages": [{}, *2 * [{"freeze_policy": "freeze-below", "freeze": ["embeddings"],
                                        "train": ["lm_head", "norm"]}]]},
    },
    # Arbor: grow +4 layers at the middle when 80 % of layers exceed 0.92 utilization (5,000-step
    # cooldown). Meant for long runs: set model.preset = "arbor-500m-1b" and many more steps.
    "arbor": {
        "growth": {"trigger": "utilization", "insertion_policy": "middle",
                   "step": {"axis": "depth", "num_layers": 4}},
    },
}

#: Recipes written as TOML files (``NAME.toml``: settings as in a config file, plus a ``[recipe]`` table
#: with its ``description`` and, optionally, ``extends = "OTHER"``, a recipe whose settings it starts from).
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """Every name ``--recipe`` takes: the built-in ones, then the TOML files of `RECIPE_DIR`."""
    files = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))
    return [*RECIPES, *(name for name in files if name not in RECIPES)]


def load_recipe(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of recipe ``name`` (a built-in one, or ``RECIPE_DIR/NAME.toml`` merged onto what it extends)."""
    if name in RECIPES:
        return copy.deepcopy(RECIPES[name])
    if name not in recipe_names():  # a name, never a path: `--recipe ../x` must not read any TOML on disk
        hint = "; a settings file is given as CONFIG (arbor train FILE)" if "/" in name or "\\" in name else ""
        raise ValueError(f"--recipe {name!r} is unknown; allowed: {', '.join(recipe_names())}{hint}")
    file = RECIPE_DIR / f"{name}.toml"
    data = tomllib.loads(file.read_text(encoding="utf-8"))
    about = data.pop("recipe", {})
    unknown = sorted(set(about) - {"description", "extends"})
    if unknown:  # a setting written below [recipe] in the file lands in that table
        raise ValueError(f"recipe {file}: [recipe].{unknown[0]} is not a recipe key (description, extends); "
                         "settings go above the [recipe] table")
    base = about.get("extends")
    if base is None:
        return data
    if base in (*_seen, name):
        raise ValueError(f"--recipe {name}: recipes extend each other in a cycle ({' -> '.join((*_seen, name, base))})")
    return _merge(load_recipe(base, (*_seen, name)), data)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, booleans, lists, tables) when it parses, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(target: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {assignment!r} is invalid: use key=value, e.g. --set lr=1e-3 or model.preset=tiny")
    parts = key.strip().split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part!r} is not a table")
        node = child
    node[parts[-1]] = _parse_value(value.strip())


class _YamlLoader(yaml.SafeLoader):
    """YAML's safe loader, reading ``2e-3`` as the number it is: YAML 1.1 (PyYAML) wants a dot in a
    float and would hand ``lr: 2e-3`` on as text, which the typed settings then refuse."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = read_utf8(file)  # a byte that is not UTF-8: an error naming the line and column
    try:
        if file.suffix == ".json":  # what a run saves as train_config.json
            data = json.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_YamlLoader) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is the user's file, shown in one line
        raise ValueError(f"{path}: cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: Settings a resumed run may change with ``--set``: how long it runs and how it reports. Everything
#: else (data, tokenizer, model, batch, growth, seed) was fixed when the run started.
RESUMABLE = ("max_steps", "lr", "min_lr_ratio", "grad_clip", "eval_interval", "eval_batches", "log_interval",
             "save_interval", "keep_checkpoints", "sample_prompt", "sample_tokens", "on_nonfinite", "device",
             "compile")


def resume_config(saved: dict[str, Any], args: argparse.Namespace, selection=None):
    """The saved settings of a run being resumed, with the ``--set`` / ``--max-steps`` that may change.

    A CONFIG or ``--recipe`` given with ``--resume`` (the command that started the run, plus
    ``--resume``) is accepted when it describes the same run: its settings must equal the saved
    ones except those in `RESUMABLE`, which it may change like ``--set``.
    """
    data = copy.deepcopy(saved)
    if args.config or args.recipe != "default":
        given = f"CONFIG {args.config}" if args.config else f"--recipe {args.recipe}"
        raw = gather_settings(args)
        new = _validate(raw, selection).model_dump(mode="json")
        for key in sorted(set(new) & set(saved)):
            if key not in RESUMABLE and new[key] != saved[key]:
                raise ValueError(f"{given}: {key}={new[key]!r}, but the run being resumed has {key}={saved[key]!r}; "
                                 f"--resume continues a run with its saved settings, changing only "
                                 f"{', '.join(RESUMABLE)}; start a new run (another --out) for other settings")
        data.update({key: raw[key] for key in RESUMABLE if key in raw})
    elif args.data is not None and args.data != saved.get("data"):
        raise ValueError(f"--data {args.data}: --resume continues on the run's own data ({saved.get('data')!r}); "
                         "start a new run (another --out) to train on other data")
    for assignment in args.set or []:
        key = assignment.partition("=")[0].strip()
        before = copy.deepcopy(data)
        apply_override(data, assignment)
        if key not in RESUMABLE and data != before:  # the value the run already has is no change
            raise ValueError(f"--set {assignment}: {key} was fixed when the run started and cannot change with "
                             f"--resume; --set may change: {', '.join(RESUMABLE)}")
    if args.max_steps is not None:
        data["max_steps"] = args.max_steps
    if getattr(args, "compile", False):
        data["compile"] = True
    return _validate(data, selection)


def gather_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gives, unvalidated: recipe, CONFIG, ``--set``, then the flags."""
    data = load_recipe(args.recipe)
    if args.config:
        # A file may use the Arbor card's keys (model.num_layers, growth.layer_growth_*): read as arbor's.
        card = translate_card_keys(read_config_file(args.config))
        if card.notice(args.config) and Ranks.from_env().main:
            print(card.notice(args.config), file=sys.stderr)
        data = _merge(data, card.settings)
    for assignment in args.set or []:
        apply_override(data, assignment)
    model = data.get("model")
    if isinstance(model, dict) and "min_layers" in model and "num_hidden_layers" not in model:
        model["num_hidden_layers"] = model["min_layers"]  # no depth given: the run starts at its smallest
    if args.data is not None:
        data["data"] = args.data
    if args.max_steps is not None:
        data["max_steps"] = args.max_steps
    if getattr(args, "compile", False):
        data["compile"] = True
    return data


def _validate(data: dict[str, Any], selection=None) -> TrainConfig:
    # Every problem at once: the validation errors, and what check_run finds in the settings that did validate.
    return validate_run_settings(data, selection)


def build_config(args: argparse.Namespace, selection=None):
    """The settings of a new run, validated (`gather_settings`)."""
    return _validate(gather_settings(args), selection)


def prepare(config, echo=print, progress=True):
    """Corpus -> tokenizer -> packed train/validation blocks."""
    # "stdlib" is split by file (a hash of each file's relative path); other corpora by split_documents.
    documents, train_docs, val_docs = load_split(config.data, seed=config.seed)
    chars = sum(map(len, documents))
    echo(f"data: {config.data} ({len(documents):,} documents, {chars / 1e3:,.0f} K characters)")
    tokenizer = _substrate_tokenizer(config) if config.tokenizer == "auto" else None
    if tokenizer is not None:
        echo(f"tokenizer: the {config.model.get('substrate')!r} substrate's own, {len(tokenizer):,} tokens")
    elif config.tokenizer in ("auto", "bpe"):
        tokenizer = train_bpe(train_docs, vocab_size=config.vocab_size, show_progress=None if progress else False)
        echo(f"tokenizer: byte-level BPE trained on the training split, {len(tokenizer):,} tokens")
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        echo(f"tokenizer: {config.tokenizer} ({len(tokenizer):,} tokens)")
    special = dict(parse_special=config.parse_special_tokens)
    train = PackedDataset.from_documents(train_docs, tokenizer, config.seq_len, **special)
    val = PackedDataset.from_documents(val_docs, tokenizer, config.seq_len, **special)
    if len(train) < 1 or len(val) < 1:
        raise ValueError(f"data: {config.data} gives {len(train)} training and {len(val)} validation blocks of "
                         f"seq_len={config.seq_len} tokens; use more text or a shorter seq_len")
    echo(f"blocks of {config.seq_len} tokens: {len(train):,} training, {len(val):,} validation")
    return tokenizer, train.batch(range(len(train)))["input_ids"], val.batch(range(len(val)))["input_ids"]


def _substrate_tokenizer(config):
    """The tokenizer the configured substrate asks for (None: any will do)."""
    name = config.model.get("substrate")
    if not name:
        return None
    component = get_registry().get("substrate", name)
    ask = getattr(component, "default_tokenizer", None)
    settings = component.validate_settings(config.model.get("substrate_settings"))
    return ask(settings) if ask is not None else None


def build_model(config, tokenizer, selection=None):
    """The model ``config.model`` describes; ``plugins.toml``'s [substrate], [attention_backend] and
    [rope_scaling] apply where the model settings name none."""
    spec = dict(config.model)
    preset = spec.pop("preset", "tiny")
    if selection is not None and selection.name("substrate") and "substrate" not in spec:
        spec["substrate"] = selection.name("substrate")
        spec["substrate_settings"] = selection.settings("substrate").model_dump()
    attn = spec.pop("attn_implementation", None)
    if attn is None and selection is not None:
        attn = selection.name("attention_backend")
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model_config = ArborConfig.from_preset(preset, **{**spec, **ids})
    if "rope_parameters" not in spec and "rope_scaling" not in spec:
        apply_rope_scaling(model_config, selection)  # into the config, so the saved model carries it
    return ArborForCausalLM._from_config(model_config, attn_implementation=attn or DEFAULTS["attention_backend"])


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG", help="a TOML or YAML file of training settings")
    p.add_argument("--recipe", default="default", help=f"a ready-made run: {', '.join(recipe_names())} (default: default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set lr=1e-3 --set model.preset=tiny (repeatable)")
    p.add_argument("--plugins", metavar="PATH", help="plugins.toml choosing trigger, policies, init scheme "
                                                      "(default: ./plugins.toml when present)")
    p.add_argument("--data", help="'stdlib' (default: CPython's standard-library source), 'builtin' (CPython's "
                                  "English reference text), text files or a glob, a .jsonl file, or a saved dataset")
    p.add_argument("--out", default="runs/arbor", help="run directory (default: runs/arbor)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (recompiled after each growth step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine: starts torchrun's agent, which runs this command "
                        "in each (the same as `torchrun --nproc-per-node N -m arbor train ...`)")
    p.add_argument("--parallel", default="ddp", metavar="MODE",
                   help="how several processes share the work: ddp, each holds the whole model (default); fsdp, "
                        "the model and optimizer state are sharded over them (FSDP2; no hidden-size growth)")
    p.add_argument("--check", action="store_true",
                   help="only check the settings (all problems at once) and print the resolved run")


def _launch(args: argparse.Namespace) -> int:
    """``arbor train --nproc N``: this command again in N processes, under torchrun's elastic agent."""
    if Ranks.from_env().distributed:
        raise ValueError("--nproc: this process is already one of a distributed run (torchrun set WORLD_SIZE); "
                         "start either with torchrun or with --nproc, not both")
    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            argv.append(item)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "arbor", *argv])
    except ChildFailedError as exc:
        if exc.get_first_failure()[1].exitcode == USAGE_ERROR:
            return USAGE_ERROR  # a process refused the command line (and said why above); the agent ended the rest
        failures = ", ".join(f"rank {rank}: exit code {f.exitcode}" for rank, f in sorted(exc.failures.items()))
        raise TrainingStopped(f"a process of the distributed run failed ({failures}); its error is printed above") \
            from None
    return 0


def _plan(args: argparse.Namespace, out: Path, warn, selection=None, started: bool | None = None
          ) -> tuple[TrainConfig, Path | None, bool]:
    """What the command will do in ``out``, found by reading only: the run's settings, the checkpoint
    it resumes from (or None), and whether it starts again a run that has no checkpoint yet.

    ``started``: whether an earlier process had begun a run there (left the lock file); by default,
    whether the lock file is there now (the caller that has just written it says what it found before).
    """
    checkpoint = latest_intact_checkpoint(out, warn=warn) if args.resume else None
    if args.resume and checkpoint is None and latest_checkpoint(out) is not None:
        raise ValueError(f"--resume: every checkpoint in {out / 'checkpoints'} is damaged (see the warnings above)")
    if checkpoint is not None:
        saved, _ = load_trainer_state(checkpoint)
        check_checkpoint(checkpoint, saved, out, RESUMABLE)
        config = resume_config(saved["config"], args, selection)
        if config.max_steps <= saved["step"]:
            raise ValueError(f"--max-steps {config.max_steps}: the run is at step {saved['step']} already "
                             f"({checkpoint.name}); give a larger --max-steps to train on")
        return config, checkpoint, False
    if not args.resume:
        config = build_config(args, selection)  # a mistake in the settings first: it is what the user came to fix
        if latest_checkpoint(out) is not None and not args.check:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return config, None, holds_run(out)
    # --resume, and no checkpoint: a run killed before its first one starts again from step 0, with
    # its saved settings when it got as far as writing them (the lock file is written before them).
    if holds_run(out):
        try:
            saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{out / 'train_config.json'}: cannot be read ({exc})") from None
        return resume_config(saved, args, selection), None, True
    if (out / LOCK).is_file() if started is None else started:
        return build_config(args, selection), None, True
    raise ValueError(f"--resume: {out} holds no run to resume (no checkpoint, no train_config.json); "
                     "start without --resume")


@command("train", "Train a growing model: built-in corpus and settings by default.", _train_arguments)
def train_command(args: argparse.Namespace) -> int:
    if args.parallel not in distributed.PARALLEL:
        raise ValueError(f"--parallel {args.parallel!r} is unknown; allowed: {', '.join(distributed.PARALLEL)}")
    out = check_out(args.out)
    selection = load_plugins_toml(args.plugins)
    if args.check:  # reads the settings (and, with --resume, the checkpoint); writes nothing
        return _check(args, out, selection)
    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc {args.nproc} is invalid: must be >= 1")
        # Every problem of the command line before a process starts: each process would print it again.
        check_own(out)
        config, _, _ = _plan(args, out, lambda message: None, selection)
        _preflight(config, selection, args.parallel)
        distributed.check_batch_size(config.batch_size, Ranks(world_size=args.nproc))
        return _launch(args)
    ranks = Ranks.from_env()
    check_own(out)  # before the lock, which would be the first file arbor writes there
    started = (out / LOCK).is_file()
    lock = RunLock(out).acquire() if ranks.main else None  # one process per run directory
    try:
        return _train(args, out, selection, ranks, started)
    finally:
        if lock is not None:
            lock.release()


def _preflight(config, selection, parallel: str) -> dict[str, Any]:
    resolved = check_run(config, selection)  # every problem now, before data, tokenizer or model
    if parallel == "fsdp":
        check_growth_settings(config.growth.model_dump())
    return resolved


def _check(args: argparse.Namespace, out: Path, selection) -> int:
    """``arbor train --check``: the resolved run, or every problem with its settings."""
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    config = _plan(args, out, warn, selection)[0]
    resolved = _preflight(config, selection, args.parallel)
    print(json.dumps({"settings": config.model_dump(mode="json"), "resolved": resolved}, indent=1))
    if not args.resume and latest_checkpoint(out) is not None:
        print(f"note: {out} already holds a run; to start this one give another --out (or --resume to continue "
              "that one)")
    print("ok: the run's settings are valid")
    return 0


def _train(args: argparse.Namespace, out: Path, selection, ranks: Ranks, started: bool) -> int:
    say = print if ranks.main else (lambda *a, **k: None)
    check_own(out)
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    config, resume_from, restart = _plan(args, out, warn, selection, started)
    _preflight(config, selection, args.parallel)
    distributed.check_batch_size(config.batch_size, ranks)
    distributed.init(ranks, config.device)
    distributed.barrier(ranks)  # every rank has looked at --out before rank 0 writes to it
    if ranks.main and resume_from is None:
        if restart:
            print(f"{out}: no checkpoint yet; starting the run from step 0", file=sys.stderr)
            truncate_metrics(out, -1)  # the records of the run being started again, which arbor wrote
        # The run's settings before anything else: a run killed from here on can be resumed.
        write_config(out, config.model_dump(mode="json"))
    torch.manual_seed(config.seed)
    tokenizer, train_blocks, val_blocks = prepare(config, echo=say, progress=not args.no_progress)
    quiet = dict(progress=not args.no_progress, plugins=selection, ranks=ranks, parallel=args.parallel)
    if resume_from is not None:
        say(f"resuming from {resume_from}")
        trainer = Trainer.resume(resume_from, train_blocks, val_blocks, out, tokenizer=tokenizer, config=config,
                                 **quiet)
    else:
        model = build_model(config, tokenizer, selection)
        trainer = Trainer(model, config, train_blocks, val_blocks, out, tokenizer=tokenizer, **quiet)
    layers = trainer.model.config.num_hidden_layers
    where = f" in {ranks.world_size} processes ({args.parallel})" if ranks.distributed else ""
    say(f"model: {trainer.num_parameters():,} parameters, {layers} layers; {config.max_steps} steps of "
        f"{config.batch_size * config.grad_accum} x {config.seq_len} tokens{where}", flush=True)
    summary = trainer.fit()
    say(f"done: step {summary['step']}, {summary['tokens']:,} tokens, loss {summary['loss']:.3f}, validation "
        f"loss {summary['val_loss']:.3f}, {summary['growth_events']} growth events, {summary['params']:,} "
        f"parameters, {summary['layers']} layers")
    # A sharded model generates only with every rank taking part in each forward.
    sample = trainer.sample() if config.sample_tokens and (ranks.main or trainer.sharded) else None
    if ranks.main:
        print(f"checkpoint: {summary['checkpoint']}")
        print(f"metrics: {out / 'metrics.jsonl'}; plot: {plot_run(out)}")
        if sample is not None:
            print(f"sample: {sample!r}")
    sys.stdout.flush()
    distributed.finish(ranks)
    return 0
