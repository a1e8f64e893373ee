"""The pruning stages as library calls: prune_checkpoint, sweep_checkpoint, and prune's TensorBoard events.

Each takes explicit arguments and returns a JSON-able dict; the CLI only parses options and
prints. Both read a checkpoint and the data its recorded config names, on disk only (never
downloading): TestSet and the recalibrator come from here, and slimctl.pipeline.inspection
evaluates with the same TestSet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl.base.device import resolve_device, resolve_precision
from slimctl.base.files import check_output
from slimctl.core.compensate import COMPENSATE_MODES
from slimctl.core.exactness import measure_exactness
from slimctl.core.flops import count_flops, count_params
from slimctl.core.plan import gap_cut, group_scores, make_plan, validate_ratio
from slimctl.core.recalibrate import Recalibrator
from slimctl.core.surgery import applied_plan, apply_plan
from slimctl.core.sweep import largest_safe_ratio, sweep_model
from slimctl.core.targets import Target, plan_for_target
from slimctl.data import build_loader
from slimctl.pipeline.widths import aligned, aligner, measured_counts
from slimctl.pipeline.latency import (Deploy, LatencyTarget, conditions, confirm, deployed_latency,
                                      plan_for_latency)
from slimctl.pipeline.speed import checked_speed
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.io.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from slimctl.io.config import Config, DataConfig, config_from_dict
from slimctl.output.report import plot_gamma_histogram, plot_sweep
from slimctl.output.tblog import write_prune
from slimctl.trace import channel_groups
from slimctl.train import evaluate


def recorded_config(ckpt: dict[str, Any], source: str) -> Config | None:
    if not isinstance(ckpt.get("config"), dict):
        return None
    try:
        return config_from_dict(ckpt["config"])
    except SlimctlError as exc:
        raise SlimctlError(f"{source}: its recorded config is invalid ({exc})") from None


def _data_on_disk(cfg: Config, data_root: str | None) -> DataConfig:
    """The checkpoint config's data section, at `data_root` if given, never downloading: prune,
    sweep and eval read what is on disk or say where to point them."""
    data = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=data_root)
    return dataclasses.replace(data, download=False)


class TestSet:
    """The test split a checkpoint's config names, loaded once and evaluated on any model, in
    batches of `batch_size` images (default: the config's data.test_batch_size)."""

    def __init__(self, cfg: Config, device: torch.device, data_root: str | None, subset: int | None = None,
                 batch_size: int | None = None) -> None:
        data = _data_on_disk(cfg, data_root)
        if batch_size is not None:  # >= 1, checked by the CLI
            data = dataclasses.replace(data, test_batch_size=batch_size)
        self.loader = build_loader(data, train=False, device=device,
                                   subset=subset)
        self.device = device
        self.dtype = resolve_precision(cfg.train.precision, device)
        self.what = f"evaluating on the {data.name} test set (batch size {data.test_batch_size})"

    def top1(self, model: nn.Module) -> tuple[float, float]:
        """(mean cross-entropy, top-1 %); out of memory is the one-line error that names --batch-size."""
        with out_of_memory_as_error(self.what, "--batch-size"):
            return evaluate(model.to(self.device), self.loader, device=self.device, dtype=self.dtype)


@dataclass(frozen=True)
class PruneOptions:
    """How prune and sweep cut: the per-group floor and multiple (`min_channels` None: the
    checkpoint config's prune.min_channels for prune, 1 for sweep), residual-coupled spaces, what
    removed channels' constants become, and how many training images re-estimate the BN statistics
    after the cut (0: none). prune only: `keep_gathers` keeps whole every space that would be cut
    through a gather (a selection over a concatenation or a split); `speed_check` times the pruned
    model against the unpruned one under `deploy`, and writes a faster alternative cut when it is slower
    (`slimctl.pipeline.speed`); `deploy` is also what `round_to="auto"` times under."""

    min_channels: int | None = None
    round_to: int | str = 1  # prune also takes "auto": slimctl.pipeline.widths
    coupled: str = "keep"
    compensate: str = "exact"
    recalibrate: int = 0
    keep_gathers: bool = False
    speed_check: bool = True
    deploy: Deploy = Deploy()  # prune only: the conditions of --round-to auto's and the speed check's timings


@dataclass(frozen=True)
class DataAccess:
    """Where the data set lives (None: where the checkpoint's config says), the test batch size
    (None: the config's) and the device evaluation runs on."""

    root: str | None = None
    batch_size: int | None = None
    device: str = "cpu"


def prune_checkpoint(
    checkpoint: Path,
    out: Path | None,
    *,
    ratio: float | str | None = None,
    target: Target | None = None,
    options: PruneOptions = PruneOptions(),
    data: DataAccess = DataAccess(),
    evaluate_model: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Global-threshold pruning of a checkpoint → a narrower checkpoint, a |γ| histogram, a summary.

    The ratio is `ratio` (`auto`: at the widest clear gap of |γ|, `slimctl.core.plan.gap_cut`), or
    the smallest one that meets `target` (FLOPs, params or latency), or the checkpoint config's
    prune.ratio. `options.compensate` (exact | bias | none): see slimctl.core.compensate. `options.recalibrate` > 0 re-estimates the pruned model's BN statistics
    on that many training images (slimctl.core.recalibrate); the checkpoint keeps them, and top-1 is
    reported before and after.
    """
    min_channels, round_to, coupled = options.min_channels, options.round_to, options.coupled
    compensate, recalibrate = options.compensate, options.recalibrate
    data_root, batch_size, device = data.root, data.batch_size, data.device
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, source=str(checkpoint)).eval()
    cfg = recorded_config(ckpt, str(checkpoint))
    if compensate not in COMPENSATE_MODES:
        raise SlimctlError(f"--compensate must be one of {', '.join(COMPENSATE_MODES)}, got {compensate!r}")
    if min_channels is None:
        min_channels = cfg.prune.min_channels if cfg else 1
    if out is not None:
        _check_output(out, checkpoint, force)
    recalibrator = (_recalibrator(cfg, str(checkpoint), recalibrate, resolve_device(device), data_root)
                    if recalibrate else None)
    groups = channel_groups(model, coupled=coupled)
    widest = max((int(group_scores(model, g).numel()) for g in groups), default=0)
    if min_channels >= widest > 0:
        raise SlimctlError(f"--min-channels {min_channels} keeps every channel: the widest group has {widest}; "
                           "nothing would be pruned")
    if target is not None and options.keep_gathers:
        raise SlimctlError("--keep-gathers widens the plan after the target's search, which would then miss it; use "
                           "one or the other")
    auto = ratio == "auto" and target is None  # beside a target, _plan_for refuses the pair
    cut = gap_cut(torch.cat([group_scores(model, g) for g in groups] or [torch.zeros(0)])) if auto else None
    plan, latency = _plan_for(model, groups, cfg, ratio=cut.ratio if cut else ratio, target=target,
                              min_channels=min_channels, round_to=1 if round_to == "auto" else round_to,
                              compensate=compensate)
    widths = None
    if round_to == "auto":
        plan, widths, latency = measured_counts(model, groups, plan, target, latency, min_channels=min_channels,
                                                compensate=compensate, deploy=options.deploy)
    if options.keep_gathers:
        plan = plan.keeping(plan.gathered())
    ratio = plan.ratio
    if out is None:
        out = checkpoint.with_name(f"pruned-r{ratio:g}.pt")
        _check_output(out, checkpoint, force)
    pruned, notes, plan = applied_plan(model, plan, compensate=compensate)  # groups it could not compensate kept
    pruned.eval()
    speed = None
    if options.speed_check and latency is None:
        speed, plan, pruned, notes = _speed(model, plan, pruned, notes, compensate, options,
                                            alternatives=target is None)  # a wider cut would miss the target
    result = _prune_result(ckpt, model, pruned, plan, ratio=ratio, min_channels=min_channels, round_to=round_to,
                           compensate=compensate, notes=notes, target=target)
    result["latency"] = None if latency is None else confirm(model, pruned, latency, target)
    result["auto_cut"] = None if cut is None else cut.as_dict()
    result["widths"] = widths
    result["speed"] = speed
    test_set = None
    if evaluate_model and cfg is not None:
        try:
            test_set = TestSet(cfg, resolve_device(device), data_root, batch_size=batch_size)
        except SlimctlError as exc:
            result["eval_skipped"] = str(exc)
    result.update(_pruned_scores(model, plan, pruned, compensate, test_set, recalibrator))
    result["coupled"] = coupled
    result.update(_save_pruned(result, checkpoint, out, ckpt, model, pruned, groups))
    return result


def _prune_result(ckpt: dict[str, Any], model: nn.Module, pruned: nn.Module, plan, *, ratio: float,
                  min_channels: int, round_to: int, compensate: str, notes, target: Target | None) -> dict[str, Any]:
    """prune's summary before any scoring: the plan, the counts before and after, the exactness
    measured against what `compensate` promises (top-1 still None, no images recalibrated)."""
    exactness = measure_exactness(model, pruned, plan, compensate)
    return {
        "ratio": ratio,
        "threshold": plan.threshold,
        "min_channels": min_channels,
        "round_to": round_to,
        "channels_kept": plan.kept,
        "channels_total": plan.total,
        "params_before": count_params(model),
        "params": count_params(pruned),
        "flops_before": count_flops(model),
        "flops": count_flops(pruned),
        "top1_before": (ckpt.get("metrics") or {}).get("top1"),
        "top1": None,
        "compensate": compensate,
        "recalibrated_images": 0,
        "not_compensated": notes,
        "exactness": exactness.as_dict(),
        "exactness_warning": exactness.warning(),
        "target": None if target is None else {"kind": target.kind, "value": target.text},
        "layers": plan.layers(),
    }


def _save_pruned(result: dict[str, Any], checkpoint: Path, out: Path, ckpt: dict[str, Any], model: nn.Module,
                 pruned: nn.Module, groups) -> dict[str, str]:
    """Write the pruned checkpoint (its prune record and metrics taken from `result`) and the |γ|
    histogram of the unpruned model beside it; {out, histogram}."""
    prune_info = {k: result[k] for k in ("ratio", "threshold", "min_channels", "round_to", "coupled", "compensate",
                                         "recalibrated_images", "target", "layers", "exactness", "latency",
                                         "auto_cut", "speed", "widths")}
    metrics = {k: result[k] for k in ("params", "flops", "top1") if result[k] is not None}
    save_checkpoint(out, make_checkpoint(pruned.cpu(), stage="prune", config=ckpt.get("config"), parent=checkpoint,
                                         metrics=metrics, prune=prune_info))
    histogram = out.with_name(out.stem + "_gamma.png")
    scores = torch.cat([group_scores(model, g) for g in groups])
    plot_gamma_histogram(scores, result["threshold"], histogram,
                         title=f"|γ| of {checkpoint.name}, ratio {result['ratio']}")
    return {"out": str(out), "histogram": str(histogram)}


def sweep_checkpoint(
    checkpoint: Path,
    *,
    ratios: list[float],
    compare: Path | None = None,
    tolerance: float = 0.5,
    subset: int | None = None,
    options: PruneOptions = PruneOptions(),
    data: DataAccess = DataAccess(),
    png: Path | None = None,
    progress: Callable[[float], None] | None = None,
    latency: LatencyTarget | None = None,
) -> dict[str, Any]:
    """Top-1 right after pruning at each ratio (compensated and literal), for CHECKPOINT and, with
    `compare`, another model (e.g. its λ = 0 baseline); the largest ratio within `tolerance` points
    (of the recalibrated curve when `options.recalibrate` > 0 training images re-estimate BN
    statistics). With `latency`, each model is also timed as deployed under its conditions."""
    min_channels, round_to, coupled = options.min_channels or 1, options.round_to, options.coupled
    compensate, recalibrate = options.compensate, options.recalibrate
    data_root, batch_size, device = data.root, data.batch_size, data.device
    if compensate not in COMPENSATE_MODES:
        raise SlimctlError(f"--compensate must be one of {', '.join(COMPENSATE_MODES)}, got {compensate!r}")
    if subset is not None and subset < 1:
        raise SlimctlError(f"--subset must be >= 1, got {subset}")
    if png is not None:  # a figure sweep wrote before may be replaced; nothing else
        check_output(png, force=True, option="--png", suffix=".png")
    modes = tuple(dict.fromkeys((compensate, "none")))
    safe_by = f"{compensate}_recal" if recalibrate else compensate
    curves = {}
    for path in [checkpoint] + ([compare] if compare is not None else []):
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, source=str(path)).eval()
        cfg = recorded_config(ckpt, str(path))
        if cfg is None:
            raise SlimctlError(f"{path} records no config, so slimctl does not know its data set; sweep needs data")
        on = resolve_device(device)  # a bad --device is its own error, not a data-root one
        try:
            test_set = TestSet(cfg, on, data_root, subset, batch_size)
        except SlimctlError as exc:
            raise SlimctlError(f"sweep needs the test set: {exc} (point at it with --data-root DIR)") from None
        recalibrator = (_recalibrator(cfg, str(path), recalibrate, resolve_device(device), data_root)
                        if recalibrate else None)
        unpruned = test_set.top1(model)[1]
        timed = None if latency is None else (lambda m: deployed_latency(m, latency))
        rows = sweep_model(model, channel_groups(model, coupled=coupled), ratios, lambda m: test_set.top1(m)[1],
                           modes=modes, min_channels=min_channels, round_to=round_to, on_ratio=progress,
                           recalibrate=recalibrator, latency=timed)
        curves[str(path)] = {
            "top1_unpruned": unpruned, "params": count_params(model), "flops": count_flops(model),
            **({} if timed is None else {"latency_ms": timed(model)}),
            "rows": rows, "largest_safe_ratio": largest_safe_ratio(rows, unpruned, tolerance, safe_by),
        }
    result = {"checkpoint": str(checkpoint), "compare": None if compare is None else str(compare),
              "compensate": compensate, "recalibrated_images": recalibrator.images if recalibrate else 0,
              "safe_by": safe_by,
              "tolerance": tolerance, "subset": subset, "images": test_set.loader.dataset_size, "curves": curves,
              "latency": None if latency is None else conditions(latency)}
    if png is not None:
        plot_sweep(curves, png, modes=modes + ((safe_by,) if recalibrate else ()),
                   title=f"top-1 right after pruning ({result['images']} test images)")
        result["png"] = str(png)
    return result


def _plan_for(model: nn.Module, groups, cfg: Config | None, *, ratio: float | None,
              target: Target | LatencyTarget | None, min_channels: int, round_to: int, compensate: str):
    """(the plan of `ratio`, of the smallest ratio meeting `target`, or of the config's prune.ratio;
    for a latency target, what was measured, else None). With `round_to` > 1 the counts are its
    multiples as deployed (`widths.aligned`: folding's constant channel included)."""
    if ratio is not None and target is not None:
        raise SlimctlError("give either --ratio or one --target-flops/--target-params/--target-latency, not both")
    adjust = aligner(model, round_to, compensate, min_channels) if round_to > 1 else None
    if isinstance(target, LatencyTarget):
        return plan_for_latency(model, groups, target, min_channels=min_channels, round_to=round_to,
                                compensate=compensate, adjust=adjust)
    if target is not None:
        return plan_for_target(model, groups, target, min_channels=min_channels, round_to=round_to,
                               compensate=compensate, adjust=adjust)[0], None
    if ratio is None:
        ratio = cfg.prune.ratio if cfg else None
        if ratio is None:
            raise SlimctlError("--ratio is required (the checkpoint records no prune.ratio)")
    validate_ratio(ratio)
    plan = make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to)
    if adjust is None:
        return plan, None
    floor = {gp.group.bn: gp.kept for gp in make_plan(model, groups, ratio, min_channels=min_channels).groups}
    return aligned(model, plan, round_to, compensate=compensate, floor=floor, least=min_channels), None


def _speed(model: nn.Module, plan, pruned: nn.Module, notes: list, compensate: str, options: PruneOptions, *,
           alternatives: bool):
    """`slimctl.pipeline.speed.checked_speed`; a model it cannot time (e.g. one fx cannot trace for
    folding) keeps its prune."""
    try:
        return checked_speed(model, plan, pruned, notes, compensate=compensate, deploy=options.deploy,
                             alternatives=alternatives)
    except SlimctlError as exc:
        return {"skipped": str(exc)}, plan, pruned, notes


def _pruned_scores(model: nn.Module, plan, pruned: nn.Module, compensate: str, test_set: TestSet | None,
                   recalibrator: Recalibrator | None) -> dict[str, Any]:
    """{loss, top1} of the pruned model and `top1_none`, what the paper's literal removal would have
    scored (when there is a test set); with a recalibrator, its BN statistics are re-estimated
    (`recalibrated_images`) and {loss, top1} are those after it, `top1_not_recalibrated` before."""
    scores: dict[str, Any] = {}
    if test_set is not None:
        scores["loss"], scores["top1"] = test_set.top1(pruned)
        if compensate != "none":
            scores["top1_none"] = test_set.top1(apply_plan(model, plan, compensate="none").eval())[1]
    if recalibrator is not None:
        scores["recalibrated_images"] = recalibrator(pruned)
        if test_set is not None:
            scores["top1_not_recalibrated"] = scores["top1"]
            scores["loss"], scores["top1"] = test_set.top1(pruned)
    return scores


def _recalibrator(cfg: Config | None, source: str, images: int, device: torch.device,
                  data_root: str | None) -> Recalibrator:
    """The recalibrator of `images` training images (a fixed, data.seed-chosen subset with the
    training augmentation) from the training split `cfg` names."""
    if images < 1:
        raise SlimctlError(f"--recalibrate must be >= 1 training images (0 = off), got {images}")
    if cfg is None:
        raise SlimctlError(f"{source} records no config, so slimctl does not know its training data; "
                           "--recalibrate needs it")
    try:
        loader = build_loader(_data_on_disk(cfg, data_root), train=True, device=device, subset=images)
    except SlimctlError as exc:
        raise SlimctlError(f"--recalibrate needs the training split: {exc} (point at it with --data-root DIR)") from None
    return Recalibrator(loader, device, resolve_precision(cfg.train.precision, device))


def _check_output(out: Path, checkpoint: Path, force: bool) -> None:
    check_output(out, force=force)
    if out.resolve() == checkpoint.resolve():
        raise SlimctlError("-o must differ from the input checkpoint")


def prune_events(checkpoint: Path, result: dict[str, Any], *, own: bool) -> Path | None:
    """Write a prune's TensorBoard events: into the parent run's tb/ when it has one, else (with
    `own`) beside the pruned checkpoint; the folder written, or None."""
    parent_board = checkpoint.parent / "tb"
    if parent_board.is_dir():
        folder = parent_board
    elif own:
        out = Path(result["out"])
        folder = out.with_name(f"{out.stem}_tb")
    else:
        return None
    write_prune(folder, result)
    return folder
