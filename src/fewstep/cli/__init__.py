"""The `fewstep` command line: one parser, one `main`.

Each module of this package is one command group with an `add_commands(sub)` that adds its sub-parsers (each
sets `func`, a function of the parsed arguments returning the exit code); `common` holds what they share.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..validate import threads_int
from . import bench, evaluate, gits, learn, listing, sample, train, train_models
from .common import THREADS_HELP, Parser, finish, run

DESCRIPTION = "The `fewstep` command line: benchmarks, listings and the demo (run `fewstep COMMAND --help`)."

# The command groups in the order `fewstep --help` lists their commands.
COMMAND_MODULES = (gits, evaluate, train_models, learn, bench, train, sample, listing)


def build_parser() -> argparse.ArgumentParser:
    """The `fewstep` parser with every command of COMMAND_MODULES."""
    parser = Parser(prog="fewstep", description=DESCRIPTION)
    parser.add_argument("--threads", type=threads_int, default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    finish(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `fewstep` command (argv: the arguments after the program name; default sys.argv[1:])."""
    return run(build_parser(), argv)

