"""What every `fewstep` command shares: the console, the options several commands declare (--model, --device,
conditions), table and error printing, the one-line-error parser and `run`, the error handling of `main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..conditioning import ConditionSpec, resolve
from ..device import DEVICE_HELP
from ..errors import FewstepError
from ..integrations.diffusers_dir import DTYPES, PREFIX, pipeline_spec
from ..models import BUILTIN_MODELS, DEFAULT_MODEL
from ..models.registry import ModelInfo
from ..signals import exit_code, interrupts
from ..validate import env_threads, float_in, positive_int, threads_int

console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)  # errors: stderr, one line however long

MODEL_HELP = ("built-in model ({}), package.module:factory returning a denoiser, or diffusers:DIR (a local pipeline "
              "folder written by save_pretrained: SD 1.x/2.x, SDXL, SD3, Flux; docs/integrations.md)")
PIPELINE_FLAGS = ("height", "width", "dtype", "negative_prompt")  # folded into a diffusers:DIR spec
THREADS_HELP = ("torch CPU threads (default: $FEWSTEP_THREADS or torch's own choice); 1 is fastest for the small "
                "analytic models and on a busy machine")


def model_arg(text: str) -> str:
    """--model: a built-in model name, or `package.module:factory` / `path/file.py:factory` (a user model)."""
    if text in BUILTIN_MODELS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use a built-in model ({', '.join(BUILTIN_MODELS)}) "
                                     "or package.module:factory")


def add_model_arg(p: argparse.ArgumentParser, default: str = DEFAULT_MODEL, show_default: bool = False,
                  help: str | None = None) -> None:
    """--model, checked by `model_arg` when parsed; the help lists the built-in models unless `help` is given."""
    text = help or MODEL_HELP.format(", ".join(BUILTIN_MODELS)) + (f"; default {default}" if show_default else "")
    p.add_argument("--model", default=default, type=model_arg, help=text)
    g = p.add_argument_group("diffusers pipelines (--model diffusers:DIR)")
    g.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the "
                   "pipeline's own; a multiple of its VAE factor)")
    g.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the "
                   "pipeline's own)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the networks' dtype (default fp32); the solver arithmetic stays in full precision")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the unconditional prompt of guidance and of sampling without --prompts (default: the "
                        "pipeline's, i.e. the empty prompt)")


def fold_pipeline_flags(args: argparse.Namespace) -> None:
    """Fold --height/--width/--dtype/--negative-prompt into a `diffusers:DIR` model spec (so every command's
    `load_model(args.model)` sees them); refused with any other model."""
    given = {k: getattr(args, k) for k in PIPELINE_FLAGS if getattr(args, k, None) is not None}
    model = getattr(args, "model", None)
    if isinstance(model, str) and model.startswith(PREFIX):
        if given:
            args.model = pipeline_spec(model, **given)
    elif given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise FewstepError(f"{flags}: only for --model diffusers:DIR (a diffusers pipeline folder), not {model!r}")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device of the commands that run a model (fewstep.device)."""
    p.add_argument("--device", default=None, help=DEVICE_HELP)


def add_condition_args(p: argparse.ArgumentParser, sampling: bool = False) -> None:
    """--classes/--prompts/--guidance/--classifier-guidance (and --class with `sampling`) on a sub-command."""
    rule = ("seed s gets classes[s mod len]" if sampling else
            "each seed draws one uniformly (from a hash of the seed)")
    if sampling:
        p.add_argument("--class", dest="classes", metavar="K", help="class of every sample (conditional models)")
    p.add_argument("--classes", dest="classes", metavar="LIST",
                   help=f"classes of a conditional model, e.g. 0-9 or 1,3,5-7: {rule}; default: uniform over all")
    p.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (diffusers pipelines; encoded once; "
                   + ("seed s gets prompt s mod P)" if sampling else "each seed draws one uniformly)"))
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (default 1 = conditional model, no guidance"
                        + ("; with --predictor: its recorded scale)" if sampling else ")"))
    p.add_argument("--classifier-guidance", type=float, default=0.0, metavar="W",
                   help="classifier guidance scale with the model's noise-aware classifier (default 0 = off)")


def from_args(model: ModelInfo, args: argparse.Namespace, sampling: bool = False) -> tuple[ModelInfo, ConditionSpec]:
    """`conditioning.resolve` with the options of `add_condition_args` (cycle rule when sampling, uniform
    otherwise)."""
    return resolve(model, args.classes, args.prompts, args.guidance, args.classifier_guidance,
                   draw="cycle" if sampling else "uniform")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    """A rich table on stdout: the first two columns left-aligned, the numbers right-aligned; text escaped."""
    table = Table(title=escape(title) or None)
    for i, h in enumerate(header):
        table.add_column(escape(h), justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    console.print(table)


def print_error(message: object) -> None:
    """One line `error: …` on stderr (user text escaped, never read as rich markup)."""
    err_console.print(f"[red]error:[/red] {escape(' '.join(str(message).splitlines()))}", highlight=False)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2): `fewstep bench: error: …`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def finish(parser: argparse.ArgumentParser) -> None:
    """Every subcommand also accepts the global options (`fewstep bench --threads 1`), and every plain float
    option refuses NaN and ±inf; applied recursively to the sub-parsers of all command modules."""
    for action in parser._actions:
        if action.type is float:
            action.type = float_in()
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if "--threads" not in child._option_string_actions:
                    child.add_argument("--threads", type=threads_int, default=argparse.SUPPRESS, help=THREADS_HELP)
                finish(child)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen command's `func`: a FewstepError or an OSError is one line on stderr and
    exit code 2; Ctrl-C exits with 130 and SIGTERM with 143 (both after the command's own cleanup: checkpoints,
    no partial files), however the process was started."""
    with interrupts():
        try:
            args = parser.parse_args(argv)
            fold_pipeline_flags(args)
            threads = getattr(args, "threads", None) or env_threads()
            if threads:
                import torch

                torch.set_num_threads(threads)
            return args.func(args)
        except FewstepError as e:
            print_error(e)
            return 2
        except OSError as e:  # unwritable output or cache folder, a full disk, …
            print_error(f"{e.strerror or e}: {e.filename}" if e.filename else e)
            return 2
        except KeyboardInterrupt as e:
            code = exit_code(e)
            err_console.print("[yellow]terminated[/yellow]" if code == 143 else "[yellow]interrupted[/yellow]")
            return code
