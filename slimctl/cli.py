"""`slimctl` command line: each command parses options, makes one library call, prints the result.

Exit codes: 0 ok; 2 bad input (one message on stderr, no traceback); 1 anything unexpected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console

from slimctl._version import __version__
from slimctl.base.device import PRECISION_NAMES, PRECISIONS
from slimctl.errors import SlimctlError
from slimctl.core.compensate import COMPENSATE_MODES
from slimctl.base.groups import COUPLED_MODES
from slimctl.output.progress import reporter
from slimctl.core.sweep import DEFAULT_RATIOS


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


@cli.command("sparse-train")
@run_options("YAML config (see configs/). Its `train` section is used.",
             "Run folder for config.yaml, metrics.jsonl, last.pt, best.pt [default: runs/<config name>/sparse].")
def sparse_train_cmd(config: Path, out: Path | None, overrides: tuple[str, ...], resume: bool, force: bool,
                     log_every: str | None, tensorboard: bool) -> None:
    """Train from scratch with the L1 sparsity penalty λ·Σ|γ| on BN scales (λ = train.sparsity).

    With train.sparsity: 0 this is plain training (the baseline the paper compares against).
    Multi-GPU: `torchrun --nproc_per_node=N -m slimctl sparse-train …` (data.batch_size is the
    global batch, split over the N processes). Ctrl-C stops cleanly; --resume continues.
    """
    from slimctl.pipeline.training import sparse_train

    cfg = _load_config(config, overrides + (("log.tensorboard=true",) if tensorboard else ()))
    run_dir = out or Path("runs") / config.stem / "sparse"
    with reporter(err_console, log_every) as progress:
        result = sparse_train(cfg, run_dir, resume=resume, force=force, progress=progress, log=err_console.print)
    _print_best(result)


# prune, sweep and eval: the test batch, lowered when evaluation runs out of memory
test_batch_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=None,
    help="Test images per evaluation batch [default: the checkpoint config's data.test_batch_size].")


recalibrate_option = click.option(
    "--recalibrate", type=click.IntRange(min=0), default=0, show_default=True, metavar="IMAGES",
    help="After pruning, re-estimate the BN running statistics on this many training images (a fixed subset, "
         "forward passes only: no labels, no gradients); 0 = off. Reads the training split.")


@cli.command("prune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--ratio", type=float, default=None,
              help="Fraction of all BN channels to remove, in [0, 1), by one global |γ| threshold "
                   "[default: the checkpoint config's prune.ratio].")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Pruned checkpoint to write [default: pruned-r<RATIO>.pt beside CHECKPOINT].")
@click.option("--min-channels", type=int, default=None,
              help="No layer keeps fewer channels than this (its largest |γ|) [default: prune.min_channels, 1].")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Keep a multiple of N channels per layer (faster on GPUs/vector units); 1 = the paper.")
@click.option("--coupled", type=click.Choice(COUPLED_MODES), default="keep", show_default=True,
              help="Traced models: keep residual-coupled channels (the paper), or prune each coupled set "
                   "together, ranked by the max/mean/sum of its BNs' |γ|.")
@click.option("--compensate", type=click.Choice(COMPENSATE_MODES), default="exact", show_default=True,
              help="What a removed channel's constant output (its β, once γ ≈ 0) becomes: exact = its response "
                   "is kept (position-dependent near padded borders; the pruned model equals the original with "
                   "only those γ zeroed), bias = only its spatial mean, none = dropped (the paper's removal).")
@click.option("--target-flops", default=None, metavar="X",
              help="Instead of --ratio: the smallest ratio that removes X of the FLOPs (a fraction, e.g. 0.5) "
                   "or leaves at most X (a count, e.g. 400M).")
@click.option("--target-params", default=None, metavar="X", help="The same for parameters (e.g. 0.7 or 2.5M).")
@click.option("--data-root", default=None, help="Where the data set lives, if not where the checkpoint's config says.")
@click.option("--no-eval", is_flag=True, help="Skip the test-set evaluation of the pruned model.")
@recalibrate_option
@test_batch_option
@click.option("--device", default="cpu", show_default=True, help="Device for that evaluation (cpu, cuda, auto).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--tensorboard", is_flag=True,
              help="Write the threshold and kept-per-layer to TensorBoard: the parent run's tb/ (done anyway "
                   "when it exists), else OUT stem + _tb/.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def prune_cmd(checkpoint: Path, ratio: float | None, out: Path | None, min_channels: int | None, round_to: int,
              coupled: str, compensate: str, target_flops: str | None, target_params: str | None,
              data_root: str | None, no_eval: bool, recalibrate: int, batch_size: int | None, device: str,
              force: bool, tensorboard: bool, as_json: bool) -> None:
    """Remove the channels whose BN |γ| falls under one global threshold; write a narrower model.

    Also writes a |γ| histogram (OUT stem + _gamma.png) with the threshold marked, and evaluates
    the pruned model (before any fine-tuning) when its data set is on disk: top-1 with the chosen
    compensation and, for comparison, with none. With --recalibrate, also after the BN statistics
    are re-estimated on training images (the checkpoint keeps those statistics).
    """
    from slimctl.output.report import before_after_table, prune_table
    from slimctl.pipeline.pruning import DataAccess, PruneOptions, prune_checkpoint, prune_events
    from slimctl.core.targets import parse_target

    if target_flops is not None and target_params is not None:
        raise UserError("give one of --target-flops and --target-params, not both")
    target = None
    if target_flops is not None:
        target = parse_target("flops", target_flops)
    elif target_params is not None:
        target = parse_target("params", target_params)
    result = prune_checkpoint(
        checkpoint, out, ratio=ratio, target=target, evaluate_model=not no_eval, force=force,
        options=PruneOptions(min_channels, round_to, coupled, compensate, recalibrate),
        data=DataAccess(data_root, batch_size, device),
    )
    events = prune_events(checkpoint, result, own=tensorboard)
    if events is not None:
        result["tensorboard"] = str(events)
    if as_json:
        print_json(result)
        return
    out_console.print(prune_table(result))
    out_console.print(before_after_table(result))
    if "eval_skipped" in result:
        err_console.print(f"[yellow]not evaluated:[/] {result['eval_skipped']}")
    if result["recalibrated_images"]:
        before = result.get("top1_not_recalibrated")
        out_console.print(f"BN statistics re-estimated on {result['recalibrated_images']} training images"
                          + (f": test top-1 {before:.2f}% → {result['top1']:.2f}%" if before is not None else ""))
    for note in result["not_compensated"]:
        err_console.print(f"[yellow]note:[/] {note}")
    exactness = result["exactness"]
    if result["exactness_warning"]:
        err_console.print(f"[yellow]warning:[/] {result['exactness_warning']}")
    else:
        reference = {"exact": "with only the removed γ zeroed", "none": "with the removed γ and β zeroed",
                     "bias": "with only the removed γ zeroed (bias mode keeps a mean only)"}[result["compensate"]]
        out_console.print(f"checked: the pruned model computes the original {reference} to "
                          f"{exactness['max_rel_diff']:.1e} (relative, on a random {exactness['input_size']} probe)")
    if result["target"] is not None:
        out_console.print(f"ratio {result['ratio']:.4g} meets --target-{result['target']['kind']} "
                          f"{result['target']['value']}")
    out_console.print(f"→ {result['out']}  (histogram {result['histogram']})")


@cli.command("sweep")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True,
              help="Comma-separated ratios to try, each in [0, 1).")
@click.option("--compare", type=click.Path(path_type=Path), default=None,
              help="Another checkpoint to sweep alongside, e.g. the λ = 0 baseline of the same network.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Points of top-1 below the unpruned model's that still count as safe.")
@click.option("--subset", type=int, default=None, help="Evaluate on this many test images (a fixed choice) for speed.")
@test_batch_option
@click.option("--compensate", type=click.Choice(COMPENSATE_MODES), default="exact", show_default=True,
              help="Compensation to sweep; 'none' (literal removal) is always swept beside it.")
@recalibrate_option
@click.option("--min-channels", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--coupled", type=click.Choice(COUPLED_MODES), default="keep", show_default=True)
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the curves into this PNG.")
@click.option("--data-root", default=None, help="Where the data set lives, if not where the checkpoint's config says.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def sweep_cmd(checkpoint: Path, ratios: str, compare: Path | None, tolerance: float, subset: int | None,
              batch_size: int | None, compensate: str, recalibrate: int, min_channels: int, round_to: int,
              coupled: str, png: Path | None, data_root: str | None, device: str, as_json: bool) -> None:
    """Accuracy right after pruning at each ratio, without writing a checkpoint.

    Prints threshold, params, FLOPs and top-1 per ratio (compensated and literal removal), and the
    largest ratio within --tolerance points of the unpruned top-1. Needs the checkpoint's test set.
    """
    from slimctl.output.report import sweep_table
    from slimctl.pipeline.pruning import DataAccess, PruneOptions, sweep_checkpoint
    from slimctl.core.sweep import parse_ratios, sweep_warnings

    ratio_list = parse_ratios(ratios)
    result = sweep_checkpoint(
        checkpoint, ratios=ratio_list, compare=compare, tolerance=tolerance, subset=subset, png=png,
        options=PruneOptions(min_channels, round_to, coupled, compensate, recalibrate),
        data=DataAccess(data_root, batch_size, device),
    )
    if as_json:
        print_json(result)
        return
    out_console.print(sweep_table(result))
    for warning in sweep_warnings(result):
        err_console.print(f"[yellow]warning:[/] {warning}")
    for name, curve in result["curves"].items():
        safe = curve["largest_safe_ratio"]
        out_console.print(f"{name}: largest ratio within {tolerance:g} points of {curve['top1_unpruned']:.2f}%: "
                          + (f"{safe:g}" if safe is not None else "none of those tried"))
    if png is not None:
        out_console.print(f"→ {png}")


@cli.command("finetune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@run_options("YAML config; its `finetune` section (unset keys inherit `train`) and `data` are used.",
             "Run folder [default: <CHECKPOINT stem>-finetune beside CHECKPOINT].")
def finetune_cmd(checkpoint: Path, config: Path, out: Path | None, overrides: tuple[str, ...], resume: bool,
                 force: bool, log_every: str | None, tensorboard: bool) -> None:
    """Train a pruned checkpoint's narrower model back to accuracy (no sparsity term)."""
    from slimctl.pipeline.training import finetune

    cfg = _load_config(config, overrides + (("log.tensorboard=true",) if tensorboard else ()))
    run_dir = out or checkpoint.with_name(f"{checkpoint.stem}-finetune")
    with reporter(err_console, log_every) as progress:
        result = finetune(checkpoint, cfg, run_dir, resume=resume, force=force, progress=progress,
                          log=err_console.print)
    _print_best(result)


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None,
              help="Also draw test error, |γ| < 1e-2 and images/s per epoch of every run into this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs' rows as JSON instead of a table.")
def compare_cmd(runs: tuple[Path, ...], png: Path | None, as_json: bool) -> None:
    """Several run folders side by side (e.g. baseline, sparse and fine-tunes): one table, one figure.

    Reads each folder's metrics.jsonl and config.yaml (stage, and the machine it trained on).
    """
    from slimctl.output.report import compare_table, plot_runs
    from slimctl.output.results import read_run

    compared = [read_run(folder) for folder in runs]
    if png is not None:
        plot_runs(compared, png, title=" vs ".join(run["label"] for run in compared))
    if as_json:
        print_json({"runs": compared, "png": None if png is None else str(png)})
        return
    out_console.print(compare_table(compared))
    if png is not None:
        out_console.print(f"→ {png}")


@cli.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Artifact to write [default: CHECKPOINT with .onnx, .ts or .pt2].")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "pt2"]), default=None,
              help="[default: from OUT's suffix (.onnx, .ts, .pt2), else onnx]")
@click.option("--input-size", default=None, metavar="C,H,W",
              help="Input the artifact is traced at [default: the checkpoint's, e.g. 3,32,32 for CIFAR].")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset [default: torch's].")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold each BatchNorm into the conv before it where that is exact.")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Any batch size, or only the traced one (batch 2).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest max |Δlogits| / max |logits| the parity check accepts.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def export_cmd(checkpoint: Path, out: Path | None, fmt: str | None, input_size: str | None, opset: int | None,
               fold_bn: bool, dynamic_batch: bool, tolerance: float, force: bool, as_json: bool) -> None:
    """Write a deployable artifact that runs without slimctl: ONNX, TorchScript or torch.export (pt2).

    The artifact is run in its own runtime (onnxruntime, torch.jit.load, torch.export.load) beside
    the checkpoint on a fixed random batch before it is renamed into place; a difference above
    --tolerance is exit 2 with nothing written. slimctl's record (version, arch, widths, params,
    FLOPs, top-1, lineage) is stored inside; `slimctl info ARTIFACT` prints it. ONNX needs
    pip install 'slimctl[export]'.
    """
    from slimctl.pipeline.export import SUFFIXES, export_checkpoint, format_of, parse_input_size

    fmt = fmt or (format_of(out) if out is not None else None) or "onnx"
    if out is not None and format_of(out) not in (None, fmt):
        raise UserError(f"-o {out} has the suffix of another format than --format {fmt}; use {SUFFIXES[fmt]}")
    out = out or checkpoint.with_suffix(SUFFIXES[fmt])
    size = parse_input_size(input_size) if input_size is not None else None
    result = export_checkpoint(checkpoint, out, fmt=fmt, input_size=size, opset=opset, fold=fold_bn,
                               dynamic_batch=dynamic_batch, force=force, tolerance=tolerance)
    if as_json:
        print_json(result)
        return
    out_console.print(
        f"{result['format']} → {result['out']}  (input {','.join(map(str, result['input_size']))}, "
        f"{result['batch']} batch, BN {'folded' if fold_bn else 'kept'}: {result['bn_left']} left)\n"
        f"parity vs the checkpoint: max |Δ| {result['max_abs_diff']:.3g}, relative {result['max_rel_diff']:.3g} "
        f"(tolerance {tolerance:g})"
    )


@cli.command("scratch")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@run_options("YAML config; its `train` section is the recipe (without the sparsity term).",
             "Run folder [default: <CHECKPOINT stem>-scratch-<budget> beside CHECKPOINT].")
@click.option("--budget", type=click.Choice(["epochs", "flops"]), default="epochs", show_default=True,
              help="epochs: Scratch-E, the recipe's epochs. flops: Scratch-B, the unpruned model's compute "
                   "(epochs × unpruned / pruned FLOPs, at most 2×; the lr milestones scale with it).")
def scratch_cmd(checkpoint: Path, config: Path, out: Path | None, overrides: tuple[str, ...], resume: bool,
                force: bool, log_every: str | None, tensorboard: bool, budget: str) -> None:
    """Train a pruned checkpoint's architecture from scratch: does the slimmed model beat it?

    Same widths and selections, fresh weights (the family's init, seeded by train.seed), the config's
    `train` recipe with λ = 0. Recorded as stage `scratch` with the pruned checkpoint as parent, so
    `report` and `make table` show it beside the fine-tuned model.
    """
    from slimctl.pipeline.training import scratch

    cfg = _load_config(config, overrides + (("log.tensorboard=true",) if tensorboard else ()))
    run_dir = out or checkpoint.with_name(f"{checkpoint.stem}-scratch-{budget}")
    with reporter(err_console, log_every) as progress:
        result = scratch(checkpoint, cfg, run_dir, budget=budget, resume=resume, force=force, progress=progress,
                         log=err_console.print)
    _print_best(result)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data-root", default=None, help="Where the data set lives, if not where the checkpoint's config says.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@test_batch_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: top1 (%), loss, params, flops.")
def eval_cmd(checkpoint: Path, data_root: str | None, batch_size: int | None, device: str, as_json: bool) -> None:
    """Test-set top-1 of a checkpoint, on the data set its config names."""
    from slimctl.pipeline.inspection import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, device=device, data_root=data_root, batch_size=batch_size)
    if as_json:
        print_json(result)
    else:
        out_console.print(
            f"{result['data']} test top-1 {result['top1']:.2f}%  loss {result['loss']:.4f}  "
            f"params {result['params']:,}  FLOPs {result['flops']:,}"
        )


@cli.command("info")
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--arch", default=None, help="Describe a registered architecture instead of a checkpoint.")
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True, help="With --arch.")
@click.option("--width", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --arch: width multiplier.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: arch, params, flops, widths.")
def info_cmd(checkpoint: Path | None, arch: str | None, num_classes: int, width: float, as_json: bool) -> None:
    """Params, FLOPs (the paper's count, 1×3×32×32 input) and layer widths of a checkpoint or an arch.

    Given an exported artifact (.onnx, .ts, .pt2), the record `slimctl export` stored in it.
    """
    from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
    from slimctl.pipeline.export import format_of, read_artifact
    from slimctl.models import create_model, list_models
    from slimctl.pipeline.inspection import model_summary

    if (checkpoint is None) == (arch is None):
        raise UserError(f"give either a CHECKPOINT or --arch NAME (one of: {', '.join(list_models())})")
    if checkpoint is not None and format_of(checkpoint) is not None:  # an exported artifact: its record
        artifact = read_artifact(checkpoint)
        if as_json:
            print_json(artifact)
        else:
            from slimctl.output.report import artifact_table

            out_console.print(artifact_table(checkpoint, artifact))
        return
    if arch is not None:
        model = create_model(arch, num_classes, width=width)
    else:
        model = model_from_checkpoint(load_checkpoint(checkpoint), source=str(checkpoint))
    info = model_summary(model)
    if as_json:
        print_json(info)
    else:
        from slimctl.output.report import info_table

        out_console.print(info_table(info))


@cli.command("groups")
@click.argument("source")
@click.option("--num-classes", type=click.IntRange(min=1), default=10, show_default=True, help="With an arch name.")
@click.option("--coupled", type=click.Choice(COUPLED_MODES), default="keep", show_default=True,
              help="How residual-coupled spaces are treated (traced models).")
@click.option("--explain", is_flag=True, help="Also list the members of each space and why frozen ones keep their width.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of spaces.")
def groups_cmd(source: str, num_classes: int, coupled: str, explain: bool, as_json: bool) -> None:
    """The channel groups of a checkpoint or an arch (e.g. vgg19, torchvision.resnet50, timm.efficientnet_b0): which BN
    ranks which channels, what shrinks with it, and what keeps its width (and why)."""
    from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
    from slimctl.models import create_model, is_known_arch
    from slimctl.output.report import groups_table
    from slimctl.pipeline.inspection import explain_groups

    if Path(source).exists():
        model = model_from_checkpoint(load_checkpoint(source), source=source)
    elif is_known_arch(source):
        model = create_model(source, num_classes)
    else:
        raise UserError(f"{source!r} is neither a checkpoint file nor a known arch (vgg19, torchvision.resnet50, timm.resnet18, …)")
    rows = explain_groups(model, coupled=coupled)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        out_console.print(groups_table(rows, explain=explain))


@cli.command("report")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of stages.")
def report_cmd(checkpoint: Path, as_json: bool) -> None:
    """Params, FLOPs and test top-1 of a checkpoint and of each ancestor it records (parent chain)."""
    from slimctl.output.report import lineage_table
    from slimctl.pipeline.inspection import lineage

    rows = lineage(checkpoint)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        out_console.print(lineage_table(rows))


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,64, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"batch sizes must be >= 1, got {value!r}")
    return sizes


@cli.command("bench")
@click.argument("checkpoints", type=click.Path(path_type=Path), nargs=-1, required=True)
@click.option("--batch-sizes", default="1,64", show_default=True, callback=_batch_sizes,
              help="Comma-separated batch sizes to time.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 where the device runs it natively, else fp32.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed forward passes per batch size (after 3 warm-up passes); the median is reported.")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Time each model with its BNs folded into the convs before them where exact, as deployed.")
@click.option("--runtime", default="torch", show_default=True, metavar="torch[,onnxruntime]",
              help="Where to time: torch, onnxruntime (the model exported to ONNX, fp32, CPU; needs "
                   "pip install 'slimctl[export]'), or both, comma-separated.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch and onnxruntime (e.g. 1 for single-thread latency) [default: torch's].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
def bench_cmd(checkpoints: tuple[Path, ...], batch_sizes: list[int], device: str, precision: str, repeats: int,
              fold_bn: bool, runtime: str, threads: int | None, as_json: bool) -> None:
    """Inference latency of each checkpoint (e.g. baseline then pruned), with the speed-up against the first."""
    from slimctl.pipeline.bench import bench_checkpoints
    from slimctl.output.report import bench_table
    from slimctl.base.device import resolve_device, resolve_precision

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if threads is not None:
        torch.set_num_threads(threads)
    rows = bench_checkpoints(list(checkpoints), batch_sizes=batch_sizes, device=dev, dtype=dtype, repeats=repeats,
                             fold_bn=fold_bn, runtimes=tuple(r.strip() for r in runtime.split(",")))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        folded = "BNs folded" if fold_bn else "BNs not folded"
        title = (f"latency on {dev.type}, {torch.get_num_threads()} threads, torch {PRECISION_NAMES[dtype]}"
                 f"{' / onnxruntime fp32' if 'onnxruntime' in runtime else ''}, {folded}")
        out_console.print(bench_table(rows, title=title))


def main() -> None:
    from slimctl.train import distributed

    clean = False
    try:
        cli(prog_name="slimctl")
    except SystemExit as exc:  # click ends every command with one: 0 (or None) is success
        clean = exc.code in (0, None)
        raise
    finally:
        distributed.teardown(clean=clean)
