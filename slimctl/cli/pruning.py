"""The commands that cut: prune, sweep."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from slimctl.base.groups import COUPLED_MODES
from slimctl.cli.common import (cli, err_console, FiniteFloat, out_console, print_json, ratio_or_auto,
                                recalibrate_option, round_to_or_auto, test_batch_option, UserError)
from slimctl.core.compensate import COMPENSATE_MODES
from slimctl.core.sweep import DEFAULT_RATIOS


@cli.command("prune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--ratio", type=ratio_or_auto(), default=None,
              help="Fraction of all BN channels to remove, in [0, 1), by one global |γ| threshold "
                   "[default: the checkpoint config's prune.ratio]; or auto: cut at the widest clear gap of "
                   "|γ| (a polarized model's), refused when there is none.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Pruned checkpoint to write [default: pruned-r<RATIO>.pt beside CHECKPOINT].")
@click.option("--min-channels", type=int, default=None,
              help="No layer keeps fewer channels than this (its largest |γ|) [default: prune.min_channels, 1].")
@click.option("--round-to", type=round_to_or_auto(), default=1, show_default=True,
              help="Keep a multiple of N channels per layer (faster on GPUs/vector units); 1 = the paper; auto = "
                   "the fastest, timed here as whole models under --runtime/--latency-batch/--threads/--precision, "
                   "of γ's counts, counts chosen per layer by timing its operators (torch; cached in "
                   "~/.cache/slimctl), every count rounded up to 8 or 16, and whole groups of grouped convs "
                   "dropped instead of channels in every group.")
@click.option("--coupled", type=click.Choice(COUPLED_MODES), default="keep", show_default=True,
              help="Traced models: keep residual-coupled channels (the paper), or prune each coupled set "
                   "together, ranked by the max/mean/sum of its BNs' |γ|; these modes also prune a concatenated "
                   "space (DenseNet) at its producer, ranked by the BNs that read it, instead of a gather.")
@click.option("--compensate", type=click.Choice(COMPENSATE_MODES), default="exact", show_default=True,
              help="What a removed channel's constant output (its β, once γ ≈ 0) becomes: exact = its response "
                   "is kept (position-dependent near padded borders; the pruned model equals the original with "
                   "only those γ zeroed), bias = only its spatial mean, none = dropped (the paper's removal).")
@click.option("--target-flops", default=None, metavar="X",
              help="Instead of --ratio: the smallest ratio that removes X of the FLOPs (a fraction, e.g. 0.5) "
                   "or leaves at most X (a count, e.g. 400M).")
@click.option("--target-params", default=None, metavar="X", help="The same for parameters (e.g. 0.7 or 2.5M).")
@click.option("--target-latency", default=None, metavar="X",
              help="Instead of --ratio: the smallest ratio whose pruned model runs in at most X of the unpruned "
                   "model's time (e.g. 0.6) or in X (e.g. 8ms), measured here as deployed (BNs folded).")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="Where the model will run: every timing prune makes (--target-latency, --round-to auto, the speed "
                   "check) uses it (onnxruntime: fp32, pip install 'slimctl[export]').")
@click.option("--latency-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="The batch size those timings use.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads those timings use [default: torch's, i.e. OMP_NUM_THREADS or the cores].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="With --runtime torch: the precision those timings use.")
@click.option("--keep-gathers", is_flag=True,
              help="Keep whole every space the cut would reach through a gather (a selection over a DenseNet "
                   "concatenation or a ShuffleNet split, whose BN and ReLU still run at full width); the speed "
                   "check measures this alternative when a pruned model is not clearly faster.")
@click.option("--no-speed-check", is_flag=True,
              help="Skip timing the pruned model against the unpruned one under --runtime etc. (by default, when it is "
                   "not faster beyond 5%, prune times alternative cuts, e.g. gathers kept whole or counts rounded to 8, and "
                   "writes the fastest).")
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
def prune_cmd(checkpoint: Path, ratio: float | str | None, out: Path | None, min_channels: int | None,
              round_to: int | str,
              coupled: str, compensate: str, target_flops: str | None, target_params: str | None,
              target_latency: str | None, runtime: str, latency_batch: int, threads: int | None, precision: str,
              keep_gathers: bool, no_speed_check: bool, data_root: str | None, no_eval: bool, recalibrate: int, batch_size: int | None, device: str,
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

    from slimctl.pipeline.latency import Deploy, parse_latency

    deploy = Deploy(runtime, latency_batch, threads, precision)
    if sum(t is not None for t in (target_flops, target_params, target_latency)) > 1:
        raise UserError("give one of --target-flops, --target-params and --target-latency")
    target = None
    if target_flops is not None:
        target = parse_target("flops", target_flops)
    elif target_params is not None:
        target = parse_target("params", target_params)
    elif target_latency is not None:
        target = parse_latency(target_latency, **asdict(deploy))
    result = prune_checkpoint(
        checkpoint, out, ratio=ratio, target=target, evaluate_model=not no_eval, force=force,
        options=PruneOptions(min_channels, round_to, coupled, compensate, recalibrate, keep_gathers,
                             speed_check=not no_speed_check, deploy=deploy),
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
    print_how_it_cut(result)
    out_console.print(f"→ {result['out']}  (histogram {result['histogram']})")


def print_how_it_cut(result: dict) -> None:
    """What chose the cut (--ratio auto's gap, a target, measured widths) and what it measured (latency, speed)."""
    cut = result.get("auto_cut")
    if cut is not None:
        out_console.print(f"--ratio auto: the widest clear gap of |γ| lies between {cut['below']:.3g} and "
                          f"{cut['above']:.3g} ({cut['factor']:.3g}×); the {cut['removed']} of {cut['total']} ranked "
                          f"channels below it go (ratio {result['ratio']:.4g})")
    if result["target"] is not None:
        out_console.print(f"ratio {result['ratio']:.4g} meets --target-{result['target']['kind']} "
                          f"{result['target']['value']}")
    latency = result.get("latency")
    if latency is not None:
        out_console.print(
            f"latency {latency['unpruned_ms']:.3g} ms → {latency['pruned_ms']:.3g} ms ({latency['speedup']:.2f}×; "
            f"target {latency['target_ms']:.3g} ms), {latency['runtime']}, batch {latency['batch_size']}, "
            f"{latency['precision']}, {latency['threads']} threads; {latency['machine']}"
            + ("; its gathered spaces kept whole (so it keeps more channels at the target)"
               if latency.get("cut") == "gathers kept whole" else ""))
        if not latency["met"]:
            err_console.print("[yellow]warning:[/] timed again, the pruned model misses the target (the machine's "
                              "timing noise); pass a slightly lower --target-latency")
    widths = result.get("widths")
    if widths is not None:
        if "kept" in widths:  # beside --target-latency: each multiple searched to it
            tried = "; channels kept at the target: " + ", ".join(f"{n} {k}" for n, k in widths["kept"].items())
        elif widths["candidates"]:
            tried = "; timed as whole models: " + _timings(widths["candidates"])
        else:
            tried = "; no other count timed faster op by op"
        out_console.print(f"--round-to auto: {widths['chosen']}" + _changed(widths["changed"]) + tried)
    if result["speed"] is not None:
        print_speed(result["speed"])


def _changed(changed: list[dict]) -> str:
    """How many layers --round-to auto made wider (and, dropping whole groups, narrower) than γ chose."""
    if not changed:
        return ""
    wider = sum(c["chosen"] > c["gamma"] for c in changed)
    narrower = len(changed) - wider
    return f" ({wider} layers wider" + (f", {narrower} narrower" if narrower else "") + " than γ chose)"


def print_speed(speed: dict) -> None:
    """The speed check's line; the alternative it wrote when the first cut was not clearly faster; a
    warning when the written model is still slower."""
    if "skipped" in speed:
        err_console.print(f"[yellow]note:[/] speed check skipped: {speed['skipped']}")
        return
    line = (f"{speed['unpruned_ms']:.3g} ms → {speed['pruned_ms']:.3g} ms ({speed['speedup']:.2f}×), "
            f"{speed['runtime']}, batch {speed['batch_size']}, {speed['precision']}, BNs folded; {speed['machine']}")
    if "adopted" in speed:
        out_console.print(f"speed: the first cut was not clearly faster than the original "
                          f"({speed['first_ms']:.3g} ms against {speed['unpruned_ms']:.3g} ms); "
                          f"written instead, measured fastest: {speed['adopted']} ({_timings(speed['alternatives'])})")
    if not speed["slower"]:
        out_console.print(f"speed: {line}")
        return
    advice = (f"none of the alternatives measured was faster ({_timings(speed['alternatives'])}); "
              if "alternatives" in speed else "")
    err_console.print(f"[yellow]warning:[/] the pruned model is slower than the original: {line}. {advice}try a lower "
                      "--ratio, or --target-latency to prune to a time measured here")


def _timings(ms_by_name: dict[str, float]) -> str:
    """`name 1.23 ms, …`: what prune timed, in the order it timed them."""
    return ", ".join(f"{name} {ms:.3g} ms" for name, ms in ms_by_name.items())


@cli.command("sweep")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True,
              help="Comma-separated ratios to try, each in [0, 1).")
@click.option("--compare", type=click.Path(path_type=Path), default=None,
              help="Another checkpoint to sweep alongside, e.g. the λ = 0 baseline of the same network.")
@click.option("--tolerance", type=FiniteFloat(min=0), default=0.5, show_default=True,
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
@click.option("--latency", is_flag=True,
              help="Also time each model as deployed (BNs folded; torch, batch 1, fp32, torch's threads): an ms column.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def sweep_cmd(checkpoint: Path, ratios: str, compare: Path | None, tolerance: float, subset: int | None,
              batch_size: int | None, compensate: str, recalibrate: int, min_channels: int, round_to: int,
              coupled: str, png: Path | None, data_root: str | None, device: str, latency: bool,
              as_json: bool) -> None:
    """Accuracy right after pruning at each ratio, without writing a checkpoint.

    Prints threshold, params, FLOPs and top-1 per ratio (compensated and literal removal), and the
    largest ratio within --tolerance points of the unpruned top-1. Needs the checkpoint's test set.
    """
    from slimctl.output.report import sweep_table
    from slimctl.pipeline.pruning import DataAccess, PruneOptions, sweep_checkpoint
    from slimctl.core.sweep import parse_ratios, sweep_warnings

    from slimctl.pipeline.latency import LatencyTarget

    ratio_list = parse_ratios(ratios)
    result = sweep_checkpoint(
        checkpoint, ratios=ratio_list, compare=compare, tolerance=tolerance, subset=subset, png=png,
        latency=LatencyTarget("sweep") if latency else None,
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
