"""The commands that look and ship: eval, info, groups, report, compare, bench, export."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from slimctl.base.device import PRECISION_NAMES, PRECISIONS
from slimctl.base.groups import COUPLED_MODES
from slimctl.cli.common import cli, err_console, FiniteFloat, out_console, print_json, test_batch_option, UserError


@cli.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None,
              help="Also draw test error, |γ| < 1e-2 and images/s per epoch of every run into this PNG "
                   "(a *.png name; an existing figure is replaced only with --force).")
@click.option("--force", is_flag=True, help="Replace an existing --png figure.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs' rows as JSON instead of a table.")
def compare_cmd(runs: tuple[Path, ...], png: Path | None, force: bool, as_json: bool) -> None:
    """Several run folders side by side (e.g. baseline, sparse and fine-tunes): one table, one figure.

    Reads each folder's metrics.jsonl and config.yaml (stage, and the machine it trained on).
    """
    from slimctl.base.files import check_output
    from slimctl.output.report import compare_table, plot_runs
    from slimctl.output.results import read_run

    if png is not None:
        check_output(png, force=force, option="--png", suffix=".png")
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
@click.option("--opset", type=int, default=None,
              help="ONNX opset, 18 or later (the oldest torch's exporter writes) [default: torch's].")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Fold each BatchNorm into the conv before it where that is exact.")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Any batch size, or only the traced one (batch 2).")
@click.option("--tolerance", type=FiniteFloat(min=0), default=1e-4, show_default=True,
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
              help="How residual-coupled and concatenated spaces are treated (traced models).")
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
    from slimctl.io.lineage import lineage

    rows = lineage(checkpoint)
    for row in rows:
        if row.get("parent_replaced"):
            err_console.print(f"warning: {row['parent_replaced']}, the parent {row['path']} records, was replaced "
                              "since (its sha256 differs); its history is not shown as this model's")
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
              help="Timed forward passes per batch size and round (after 3 warm-up passes).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds, the checkpoints alternating, so a noisy machine slows them alike; the median of "
                   "the rounds' medians is reported.")
@click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
              help="Time each model with its BNs folded into the convs before them where exact, as deployed.")
@click.option("--runtime", default="torch", show_default=True, metavar="torch[,onnxruntime]",
              help="Where to time: torch, onnxruntime (the model exported to ONNX, fp32, CPU; needs "
                   "pip install 'slimctl[export]'), or both, comma-separated.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch and onnxruntime (e.g. 1 for single-thread latency) [default: torch's].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
def bench_cmd(checkpoints: tuple[Path, ...], batch_sizes: list[int], device: str, precision: str, repeats: int,
              rounds: int, fold_bn: bool, runtime: str, threads: int | None, as_json: bool) -> None:
    """Inference latency of each checkpoint (e.g. baseline then pruned), with the speed-up against the first."""
    from slimctl.pipeline.bench import bench_checkpoints
    from slimctl.output.report import bench_table
    from slimctl.base.device import resolve_device, resolve_precision

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if threads is not None:
        torch.set_num_threads(threads)
    rows = bench_checkpoints(list(checkpoints), batch_sizes=batch_sizes, device=dev, dtype=dtype, repeats=repeats,
                             rounds=rounds, fold_bn=fold_bn, runtimes=tuple(r.strip() for r in runtime.split(",")))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        folded = "BNs folded" if fold_bn else "BNs not folded"
        title = (f"latency on {dev.type}, {torch.get_num_threads()} threads, torch {PRECISION_NAMES[dtype]}"
                 f"{' / onnxruntime fp32' if 'onnxruntime' in runtime else ''}, {folded}")
        out_console.print(bench_table(rows, title=title))
