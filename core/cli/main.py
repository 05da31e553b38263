"""The ``arbor`` command line: one program, one subcommand per task.

The subcommands live in `arbor.cli.info` (plugins, presets, export),
`arbor.cli.run` (generate, grow, plot) and `arbor.cli.train` (train); each
registers itself in `arbor.cli.common.COMMANDS` when imported, and this module
imports them all, builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from arbor.cli import info, run, train  # noqa: F401 - importing them registers their subcommands
from arbor.cli.common import COMMANDS, PROG, USAGE_ERROR, Parser, package_version
from arbor.plugins import PluginError, PluginLoadError
from arbor.plugins.selection import PluginsConfigError
from arbor.training.distributed import RanksDiverged
from arbor.training.trainer import TrainingStopped
from arbor_plugins import ComponentConflictError, UnknownComponentError

__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Grow transformer language models while they train.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
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


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, like the errors, without the source line Python would print under it."""
    text = " ".join(str(message).split())
    return f"{PROG}: warning: {text}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the ``arbor`` program; returns the exit status (the console script exits with it)."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for a command that starts itself again
    # The format only: whoever records warnings (a test, a calling program) still gets them whole.
    formatted = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = formatted


def _run(args: argparse.Namespace) -> int:
    """The command, with the errors a user can act on as one line and an exit code."""
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
    except (TrainingStopped, RanksDiverged) as exc:  # the run failed, not its command line: exit 1, one line
        print(f"{PROG}: training stopped: {exc}", file=sys.stderr)
        return 1
    except PluginError as exc:  # someone else's code failed: name it, without arbor's traceback
        print(f"{PROG}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not the command line: a full disk, a folder it may not write
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}; files arbor finished writing before it are intact",
              file=sys.stderr)
        return 1
