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

DESCRIPTION = ("The `fewstep` command line: the demo, sampling, benchmarks, learned solvers, AMED training, schedules, "
               "evaluation and listings (run `fewstep COMMAND --help`).")

# The command groups; each adds its commands with `add_commands(sub)`.
COMMAND_MODULES = (bench, sample, learn, train, gits, evaluate, listing, train_models)
# The order `fewstep --help` lists the commands in: what a user does first, first; a command not named here
# follows these in the order its module added it.
COMMAND_ORDER = ("demo", "sample", "bench", "learn", "tune", "train", "gits", "analyze", "fid", "solvers", "models", "cards",
                 "train-model", "train-classifier", "train-noisy-classifier")


def build_parser() -> argparse.ArgumentParser:
    """The `fewstep` parser with every command of COMMAND_MODULES, listed in COMMAND_ORDER."""
    parser = Parser(prog="fewstep", description=DESCRIPTION)
    parser.add_argument("--threads", type=threads_int, default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    _order_commands(sub)
    finish(parser)
    return parser


def _order_commands(sub: argparse._SubParsersAction) -> None:
    """Reorder the commands in place (the usage line and the help listing) as COMMAND_ORDER says."""
    rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
    commands = sorted(sub.choices.items(), key=lambda item: rank.get(item[0], len(rank)))  # stable: rest in order
    sub.choices.clear()  # the same dict as the action's name → parser map: keep it, reorder its entries
    sub.choices.update(commands)
    sub._choices_actions.sort(key=lambda action: rank.get(action.dest, len(rank)))


def main(argv: Sequence[str] | None = None) -> int:
    """The `fewstep` command (argv: the arguments after the program name; default sys.argv[1:])."""
    return run(build_parser(), argv)

