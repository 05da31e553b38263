"""The ``arbor`` command line (`arbor.cli.main`), the top layer: it builds on every other."""

from arbor.cli.main import COMMANDS, build_parser, main, parse_args

__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]
