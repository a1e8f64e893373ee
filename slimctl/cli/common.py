"""What every command shares: the group, the errors and exit codes (a SlimctlError becomes one line
and exit 2), the consoles, the run and data options, and `main` (the console entry point).

Exit codes: 0 ok; 2 bad input (one message on stderr, no traceback); 1 anything unexpected.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from slimctl._version import __version__
from slimctl.errors import SlimctlError


class UserError(click.ClickException):
    """Shown as `Error: message` on stderr; exit code 2 like click's own usage errors."""

    exit_code = 2


class Stopped(click.ClickException):
    """A run stopped by a signal: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(self.message, err=True)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from slimctl.train import Interrupted

        try:
            return super().invoke(ctx)
        except SlimctlError as exc:
            raise UserError(str(exc)) from None
        except Interrupted as exc:
            raise Stopped(f"Interrupted: {exc}", 128 + exc.signum) from None
        except KeyboardInterrupt:
            raise Stopped("Aborted: the checkpoints on disk are the last complete ones", 130) from None
        except OSError as exc:  # disk full, permission denied: the environment, not a slimctl bug
            raise click.ClickException(f"{exc} (files already on disk were left intact)") from None


out_console = Console()


err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2))


SET_HELP = "Override a config key, YAML-typed, e.g. --set train.epochs=10 --set data.subset=512. Repeatable."


RESUME_HELP = "Continue the run in the output folder from its last.pt."


FORCE_HELP = "Start over in an output folder that already holds checkpoints (they are replaced)."


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slimctl")
def cli() -> None:
    """Network slimming (Liu et al., ICCV 2017): sparse-train → prune → finetune.

    \b
    slimctl sparse-train -c configs/demo.yaml -o runs/demo/sparse
    slimctl prune runs/demo/sparse/best.pt --ratio 0.5 -o runs/demo/pruned.pt
    slimctl finetune runs/demo/pruned.pt -c configs/demo.yaml -o runs/demo/finetune
    slimctl report runs/demo/finetune/best.pt

    Checkpoints carry their model's shape, so every stage (and `prune` again: the multi-pass
    scheme) reads the previous stage's output directly.
    """


def _load_config(config: Path, overrides: tuple[str, ...]):
    """The config, checked before any run folder is touched: types and ranges, then names."""
    from slimctl.io.config import load_config
    from slimctl.pipeline.inspection import check_names

    cfg = load_config(config, overrides)
    check_names(cfg)
    return cfg


def _print_best(result: dict[str, Any]) -> None:
    from slimctl.train.distributed import from_env

    if from_env().is_main:  # under torchrun, once
        out_console.print(f"best test top-1 {result['best_top1']:.2f}%  → {result['best']}")


def run_options(config_help: str, out_help: str):
    """The options sparse-train and finetune share: config, run folder, overrides, resume/force."""

    def decorate(command):
        for option in reversed((
            click.option("-c", "--config", "config", type=click.Path(path_type=Path), required=True, help=config_help),
            click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help=out_help),
            click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP),
            click.option("--resume", is_flag=True, help=RESUME_HELP),
            click.option("--force", is_flag=True, help=FORCE_HELP),
            click.option("--log-every", default=None, metavar="N|Ns|N%",
                         help="A plain progress line every N steps, N seconds or N% of an epoch (e.g. 50, 30s, "
                              "5%). Default: rich's "
                              "bar on a terminal; else a line every 30 s or 10% of an epoch."),
            click.option("--tensorboard", is_flag=True,
                         help="Write TensorBoard events to RUN_DIR/tb (same as log.tensorboard: true; "
                              "needs pip install 'slimctl[tb]')."),
        )):
            command = option(command)
        return command

    return decorate


class FiniteFloat(click.FloatRange):
    """click's FloatRange, refusing nan and inf too (a range check lets nan through: nan < 0 is False)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class OrAuto(click.ParamType):
    """A value of `base`, or the word `auto` (prune --ratio auto, --round-to auto)."""

    def __init__(self, base: click.ParamType, what: str, hint: str) -> None:
        self.base, self.what, self.hint, self.name = base, what, hint, f"{base.name}|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return self.base.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not a valid {self.what}: give {self.hint} or auto", param, ctx)


def ratio_or_auto() -> OrAuto:
    """prune --ratio: a finite number (its range is checked with the plan), or `auto`."""
    return OrAuto(FiniteFloat(), "ratio", "a number in [0, 1)")


def round_to_or_auto() -> OrAuto:
    """prune --round-to: a multiple N >= 1, or `auto` (each layer's count chosen by measurement)."""
    return OrAuto(click.IntRange(min=1), "--round-to", "an integer >= 1")


# prune, sweep and eval: the test batch, lowered when evaluation runs out of memory
test_batch_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=None,
    help="Test images per evaluation batch [default: the checkpoint config's data.test_batch_size].")


recalibrate_option = click.option(
    "--recalibrate", type=click.IntRange(min=0), default=0, show_default=True, metavar="IMAGES",
    help="After pruning, re-estimate the BN running statistics on this many training images (a fixed subset, "
         "forward passes only: no labels, no gradients); 0 = off. Reads the training split.")


def main() -> None:
    from slimctl.train import distributed

    clean = False
    try:
        cli(prog_name="slimctl")
    except SystemExit as exc:  # click ends every command with one: 0 (or None) is success
        clean = exc.code in (0, None)
        raise
    finally:
        ranked = distributed.active()
        distributed.teardown(clean=clean)
        if ranked and clean:
            # A torchrun rank whose work is done and written: leave without the interpreter's
            # teardown, where gloo's threads raced the C++ destructors and about 1 run in 16 of a
            # 2-process CPU run ended with SIGABRT ("terminate called without an active exception")
            # after its last checkpoint. Nothing is left to write; the streams are flushed first.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
