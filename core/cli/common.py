"""What every ``arbor`` subcommand shares: the command table, the parser class, exit codes and
the checks on a checkpoint directory.

A subcommand is a function ``run(args) -> int`` plus a function that adds its
arguments, registered with :func:`command` in one of the command modules
(`arbor.cli.info`, `arbor.cli.run`, `arbor.cli.train`); `arbor.cli.main`
imports them all and builds the parser. Errors the user can fix (a bad name, a
bad file) print one ``arbor: error: ...`` line and exit with status 2; only
bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from arbor.model import checkpoint as checkpoint_files

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


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, like every other arbor error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def package_version() -> str:
    try:
        return version("arbor-lm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain left-aligned columns; no dependency for something this small."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: Tokenizer files a checkpoint directory may hold; copied next to the export as they are.
#: (Defined with the other names of a model directory, in `arbor.model.checkpoint`.)
TOKENIZER_FILES = checkpoint_files.TOKENIZER_FILES


class OutputWriteError(ValueError):
    """The output directory could not be written (a full disk, no permission); names it."""


def check_output(out: str, checkpoint: str, overwrite: bool, label: str) -> None:
    """Refuse, in one line, an output directory a grow or export of ``checkpoint`` must not write:
    a file, the checkpoint or a directory containing it or inside it, a run directory, or a
    directory holding anything arbor did not write (see
    `arbor.model.checkpoint.check_output_directory`); a non-empty one needs ``--overwrite``."""
    checkpoint_files.check_output_directory(out, overwrite=overwrite, label=label, sources=[checkpoint],
                                            overwrite_hint="pass --overwrite")


@contextmanager
def writing(out: str, checkpoint: str):
    """Turn an OSError while the output is written (the disk is full, the directory is read-only)
    into one line naming it; the writers build the output aside, so neither it nor the checkpoint
    has changed."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise OutputWriteError(
            f"cannot write {out}: {exc.strerror or exc}{where}; {out} was left as it was and {checkpoint} is unchanged"
        ) from None


def checkpoint_config(path: str) -> dict:
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
