"""The pipeline's stages as library calls: sparse_train, prune_checkpoint, finetune, evaluate, model_summary.

Each takes explicit arguments and returns a JSON-able dict; the CLI only parses options and
prints. Checkpoints are the only thing passed between stages.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl.train import distributed
from slimctl._version import __version__
from slimctl.io.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from slimctl.io.config import Config, DataConfig, TrainConfig, config_from_dict, save_config
from slimctl.data import DATASETS, build_loader, build_loaders, input_size_of, num_classes_of
from slimctl.base.device import compile_mode, environment, resolve_device, resolve_precision
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.base.files import file_sha256
from slimctl.output.tblog import EpochBoard, tensorboard_available, write_prune
from slimctl.core.flops import count_flops, count_params
from slimctl.base.inserted import ConstantResponse, reattach_selections
from slimctl.models import create_model, is_known_arch, list_models, module_widths
from slimctl.models.layers import init_paper_weights
from slimctl.base.registry import TIMM, TORCHVISION, import_timm
from slimctl.core.plan import group_scores, make_plan, validate_ratio
from slimctl.core.recalibrate import Recalibrator
from slimctl.output.report import plot_gamma_histogram, plot_sweep
from slimctl.core.sparsity import bn_scales, budget_warning, gamma_stats, l1_budget, sparsity_for_budget
from slimctl.core.compensate import COMPENSATE_MODES
from slimctl.core.exactness import measure_exactness
from slimctl.core.surgery import applied_plan, apply_plan
from slimctl.core.sweep import largest_safe_ratio, sweep_model
from slimctl.core.targets import Target, plan_for_target
from slimctl.trace import channel_groups, space_rows, trace_model
from slimctl.train import Distill, evaluate, fit, lr_sum, milestone_epochs

CHECKPOINT_NAMES = ("last.pt", "best.pt")


def check_names(cfg: Config) -> None:
    """The names a config uses exist: its arch in the model registry, its data set in slimctl.data."""
    if not is_known_arch(cfg.model.arch):
        raise SlimctlError(f"config key 'model.arch' must be one of {', '.join(list_models())} or "
                           f"torchvision.<name> or timm.<name>, got {cfg.model.arch!r}")
    if cfg.data.name not in DATASETS:
        raise SlimctlError(f"config key 'data.name' must be one of {', '.join(DATASETS)}, got {cfg.data.name!r}")


def model_summary(model: nn.Module) -> dict[str, Any]:
    """params, FLOPs (paper's count), and the widths that define the model's shape."""
    spec = model.arch_spec
    widths = module_widths(model)
    # Channels each ranked BN passes on (for a selection BN: the selected ones, not its full width).
    bn_widths = {g.bn: int(group_scores(model, g).numel()) for g in channel_groups(model)}
    return {
        "arch": spec["arch"],
        "num_classes": spec["num_classes"],
        "width": spec["arch_args"].get("width", 1.0),
        "params": count_params(model),
        "flops": count_flops(model),
        "bn_widths": bn_widths,
        "widths": widths,
    }


def load_pretrained(model: nn.Module, weights: str, *, log: Callable[[str], None] = print) -> None:
    """Start from pretrained weights: a local state_dict file, a torchvision weights name
    (downloaded by torchvision), or `timm` for a timm arch's default pretrained weights (downloaded
    by timm). Tensors whose shape differs (a head for other classes) stay fresh."""
    path = Path(weights)
    arch = model.arch_spec["arch"]
    if weights == "timm" and not path.exists():
        if not arch.startswith(TIMM):
            raise SlimctlError(f"model.weights 'timm' needs a timm.<name> arch, not {arch!r}")
        timm = import_timm("model.weights 'timm'")
        try:  # timm's default pretrained tag, at its own head size (the head stays fresh below)
            state = timm.create_model(arch[len(TIMM):], pretrained=True, **{
                k: v for k, v in model.arch_spec["arch_args"].items() if k != "width"}).state_dict()
        except Exception as exc:  # no network, no pretrained tag, a hub error, …
            raise SlimctlError(f"model.weights 'timm' for {arch}: download failed ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    elif path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SlimctlError(f"model.weights: cannot read {path} as a state_dict ({type(exc).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        import torchvision

        try:
            state = torchvision.models.get_weight(weights).get_state_dict(progress=True)
        except (ValueError, KeyError, AttributeError):
            raise SlimctlError(
                f"model.weights {weights!r} is neither a file nor a torchvision weights name "
                "(e.g. ResNet50_Weights.IMAGENET1K_V2)"
            ) from None
        except OSError as exc:
            raise SlimctlError(f"model.weights {weights!r}: download failed ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SlimctlError(f"model.weights {weights!r} is not a state_dict of tensors")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise SlimctlError(f"model.weights {weights!r} shares no tensor with {model.arch_spec['arch']}")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    log(f"pretrained: {len(usable)} tensors from {weights}" + (f"; fresh: {', '.join(fresh[:4])}" if fresh else ""))


def sparsity_targets(model: nn.Module, which: str) -> list[str]:
    """The BNs whose γ get λ·sign(γ): those a channel group ranks, or every BatchNorm2d (`all`, the
    paper's choice; the same set for the paper's families)."""
    if which == "all":
        return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
    return list(dict.fromkeys(bn for g in channel_groups(model) for bn in g.bns))


def provenance() -> dict[str, Any]:
    """Versions and git commit written beside a run's config, so a result can be traced to code."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"slimctl": __version__, "torch": str(torch.__version__), "git_commit": commit}


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into a folder that holds another run's checkpoints (nothing is created here)."""
    existing = [n for n in CHECKPOINT_NAMES if (run_dir / n).exists()]
    if resume:
        if not (run_dir / "last.pt").exists():
            raise SlimctlError(f"--resume: {run_dir / 'last.pt'} does not exist; start the run without --resume")
    elif existing and not force:
        raise SlimctlError(
            f"{run_dir} already holds {', '.join(existing)}; pass --resume to continue that run "
            "or --force to start over (its checkpoints will be replaced)"
        )


def _train(
    model: nn.Module,
    *,
    cfg: Config,
    train: TrainConfig,
    stage: str,
    run_dir: Path,
    parent: Path | None,
    resume: bool,
    progress,
    log: Callable[[str], None],
    distill: Distill | None = None,
) -> dict[str, Any]:
    """The part sparse-train and finetune share: loaders, device, precision, fit, checkpoints.
    `distill`'s teacher (on the CPU) is moved to the training device and frozen here."""
    world, device = distributed.setup(train.device)
    if train.sync_bn and world.enabled and device.type != "cuda":
        raise SlimctlError(
            "train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); set it to false for CPU runs"
        )
    dtype = resolve_precision(train.precision, device)
    if not world.is_main:
        distributed.barrier()  # rank 0 downloads/reads the data first: no concurrent downloads
    train_loader, test_loader, num_classes = build_loaders(
        cfg.data, device=device, channels_last=train.channels_last, rank=world.rank, world_size=world.world_size
    )
    if world.is_main:
        distributed.barrier()
    if num_classes != model.arch_spec["num_classes"]:
        raise SlimctlError(
            f"data.name {cfg.data.name!r} has {num_classes} classes but the model was built for "
            f"{model.arch_spec['num_classes']}; use the data set the model was trained on"
        )
    parent_sha256 = None if parent is None else file_sha256(parent)  # once, not at every save
    resume_state = None
    if resume:
        model, resume_state = _resumed(cfg, run_dir, parent, parent_sha256)
    model = model.to(device, memory_format=torch.channels_last if train.channels_last else torch.preserve_format)
    gamma_names = sparsity_targets(model, train.sparsity_on)
    gammas = bn_scales(model, gamma_names)
    if not gammas:
        raise SlimctlError(
            f"{model.arch_spec['arch']}: no BatchNorm is ranked by any channel group, so there is nothing "
            "to sparsify or prune; try train.sparsity_on: all, or `slimctl groups --explain` to see why"
        )
    strength = sparsity_strength(train, steps_per_epoch=len(train_loader))
    info = {"params": count_params(model), "flops": count_flops(model), **strength,
            "environment": environment(device, dtype)}
    if distill is not None:
        info["distill"] = {"teacher": distill.source, "alpha": distill.alpha, "temperature": distill.temperature}
    config = cfg.to_dict()

    def save(path: Path, trained: nn.Module, metrics: dict[str, Any], resume_info: dict[str, Any] | None) -> None:
        # `model`, not the wrapper being trained: DDP and torch.compile wrap it and share its parameters
        # and buffers (SyncBatchNorm conversion swaps its BN children in place, same state_dict keys).
        ckpt = make_checkpoint(
            model, stage=stage, config=config, parent=parent, parent_sha256=parent_sha256,
            metrics={**info, **metrics}, resume=resume_info,
        )
        save_checkpoint(path, ckpt)

    board = None
    if world.is_main:
        if cfg.log.tensorboard:
            tensorboard_available()  # before the folder exists: a missing extra leaves nothing behind
        # Created only now: a run refused earlier (bad data, a model too large) leaves no empty folder.
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml",
                    extra={"provenance": provenance(), "stage": stage, "sparsity_resolved": strength,
                           "environment": info["environment"]})
        if cfg.log.tensorboard:
            board = EpochBoard(run_dir / "tb", dict(zip(gamma_names, gammas)), sparsity=strength["sparsity"])
    log(
        f"{stage}: {model.arch_spec['arch']} on {cfg.data.name} ({train_loader.dataset_size} train / "
        f"{test_loader.dataset_size} test images), {device.type}, {dtype or torch.float32}, "
        f"{train.epochs} epochs, λ={strength['sparsity']:.4g}"
        + (f" (L1 budget {strength['l1_budget']:.3g})" if strength["sparsity"] else "")
        + (f", {world.world_size} processes" if world.enabled else "")
        + f" → {run_dir}"
    )
    warning = budget_warning(strength["l1_budget"], gamma_stats(gammas)["gamma_mean_abs"])
    if warning and resume_state is None:
        log(f"warning: {warning}")
    trained = model
    if world.enabled:
        if train.sync_bn:  # BN statistics over the global batch, at one all-reduce per BN layer
            trained = reattach_selections(nn.SyncBatchNorm.convert_sync_batchnorm(trained))
        # λ·sign(γ) is added after backward(), i.e. after DDP's all-reduce: once per rank, not scaled.
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    with out_of_memory_in_training(cfg, model, stage):
        result = fit(
            trained, train_loader, test_loader,
            epochs=train.epochs, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
            milestones=milestone_epochs(train.milestones, train.epochs), lr_decay=train.lr_decay,
            sparsity=strength["sparsity"], gammas=gammas, device=device, dtype=dtype, run_dir=run_dir,
            save=save, resume_state=resume_state, progress=progress, log=log,
            is_main=world.is_main, compile_mode=compile_mode(train.compile), on_epoch=board,
            distill=teacher_on_device(distill, device, train),
        )
    if board is not None:
        board.close()
    return {**info, "best_top1": result["best_top1"], "run_dir": str(run_dir), "best": str(run_dir / "best.pt")}


def out_of_memory_in_training(cfg: Config, model: nn.Module, stage: str):
    """Out of memory in a training step becomes one line: the batch (and image) size, what to lower."""
    size = input_size_of(cfg.data)[-1] if cfg.data.name == "imagefolder" else None  # pixels; fixed 32 otherwise
    what = f"training {model.arch_spec['arch']} (batch size {cfg.data.batch_size}"
    what += f", image size {size})" if size else ")"
    # A fine-tuned model's widths come from its checkpoint: model.width does not apply there.
    lower = ["data.batch_size", *(["model.width"] if stage == "sparse-train" else []),
             *(["data.image_size"] if size else [])]
    return out_of_memory_as_error(what, " or ".join(lower))


def sparsity_strength(train: TrainConfig, *, steps_per_epoch: int) -> dict[str, float]:
    """λ and the L1 budget λ·Σlr of this schedule; λ derived from `train.sparsity_budget` when set."""
    total_lr = lr_sum(lr=train.lr, milestones=milestone_epochs(train.milestones, train.epochs), decay=train.lr_decay,
                      epochs=train.epochs, steps_per_epoch=steps_per_epoch)
    if train.sparsity_budget is not None:
        sparsity = sparsity_for_budget(train.sparsity_budget, total_lr)
    else:
        sparsity = train.sparsity
    return {"sparsity": sparsity, "l1_budget": l1_budget(sparsity, total_lr), "lr_sum": total_lr}


def _resumed(cfg: Config, run_dir: Path, parent: Path | None, parent_sha256: str | None) -> tuple[nn.Module, dict]:
    """The model and resume state in `run_dir/last.pt`, after checking it continues this recipe and parent."""
    last = load_checkpoint(run_dir / "last.pt")
    if not last.get("resume"):
        raise SlimctlError(f"{run_dir / 'last.pt'} holds no resume state (the run finished or was not resumable)")
    _check_same_recipe(last.get("config"), cfg.to_dict(), run_dir)
    recorded = (last.get("parent") or {}).get("sha256")
    if parent is not None and recorded and recorded != parent_sha256:
        raise SlimctlError(
            f"--resume: {run_dir} fine-tunes another checkpoint than {parent} (it changed since); "
            "start over with --force"
        )
    return model_from_checkpoint(last, source=str(run_dir / "last.pt")), last["resume"]


# Keys a resumed run may change: extending the schedule is the usual reason to resume a finished run.
RESUMABLE_CHANGES = {"train.epochs", "finetune.epochs", "log.tensorboard"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_recipe(recorded: Any, current: dict[str, Any], run_dir: Path) -> None:
    """--resume with other settings would silently mix two recipes in one run: refuse."""
    if not isinstance(recorded, dict):
        return
    old, new = _flatten(recorded), _flatten(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        detail = ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in changed[:4])
        raise SlimctlError(
            f"--resume: the config differs from the one {run_dir} was started with: {detail}; "
            "resume with the same config, or start a new run with --force"
        )


def rank0_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """Under torchrun only rank 0 speaks: every other rank's lines would repeat its own."""
    return log if distributed.from_env().is_main else (lambda *args: None)


def sparse_train(cfg: Config, run_dir: Path, *, resume: bool = False, force: bool = False, progress=None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train from scratch with the L1 penalty λ = train.sparsity on every ranked BN scale."""
    log = rank0_log(log)
    check_names(cfg)
    prepare_run_dir(run_dir, resume=resume, force=force)
    torch.manual_seed(cfg.train.seed)  # the initial weights are part of the recorded recipe
    model = create_model(cfg.model.arch, num_classes_of(cfg.data.name, cfg.data.root), width=cfg.model.width,
                         input_size=input_size_of(cfg.data))
    if cfg.model.weights and not resume:
        load_pretrained(model, cfg.model.weights, log=log)
    return _train(model, cfg=cfg, train=cfg.train, stage="sparse-train", run_dir=run_dir, parent=None,
                  resume=resume, progress=progress, log=log)


def finetune(checkpoint: Path, cfg: Config, run_dir: Path, *, resume: bool = False, force: bool = False,
             progress=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a (pruned) checkpoint's model with the `finetune` settings; no sparsity term."""
    log = rank0_log(log)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, source=str(checkpoint))
    check_names(cfg)
    distill = teacher_for(cfg, ckpt, checkpoint)
    prepare_run_dir(run_dir, resume=resume, force=force)
    torch.manual_seed(cfg.finetune_train().seed)
    if distill is not None:
        log(f"distilling from {distill.source} (alpha {distill.alpha:g}, temperature {distill.temperature:g})")
    return _train(model, cfg=cfg, train=cfg.finetune_train(), stage="finetune", run_dir=run_dir,
                  parent=checkpoint, resume=resume, progress=progress, log=log, distill=distill)


SCRATCH_BUDGETS = ("epochs", "flops")
SCRATCH_B_CAP = 2.0  # Scratch-B trains at most this many times the epochs (Liu et al., ICLR 2019, cap it too)


def scratch_epochs(epochs: int, budget: str, *, unpruned_flops: int, pruned_flops: int) -> int:
    """Scratch-E: the same epochs. Scratch-B: the unpruned model's compute, i.e. epochs × unpruned /
    pruned FLOPs, at most SCRATCH_B_CAP × epochs (rounded to whole epochs)."""
    if budget == "epochs":
        return epochs
    return max(epochs, round(epochs * min(SCRATCH_B_CAP, unpruned_flops / max(1, pruned_flops))))


def scratch(checkpoint: Path, cfg: Config, run_dir: Path, *, budget: str = "epochs", resume: bool = False,
            force: bool = False, progress=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a pruned checkpoint's architecture (same widths and selections) from fresh weights, with
    the `train` recipe minus the sparsity term: the "is pruning worth it" baseline."""
    log = rank0_log(log)
    if budget not in SCRATCH_BUDGETS:
        raise SlimctlError(f"--budget must be one of {', '.join(SCRATCH_BUDGETS)}, got {budget!r}")
    ckpt = load_checkpoint(checkpoint)
    check_names(cfg)
    pruned = model_from_checkpoint(ckpt, source=str(checkpoint))
    history = lineage(checkpoint)
    epochs = scratch_epochs(cfg.train.epochs, budget, unpruned_flops=history[0]["flops"],
                            pruned_flops=count_flops(pruned))
    train = dataclasses.replace(cfg.train, epochs=epochs, sparsity=0.0, sparsity_budget=None)
    cfg = dataclasses.replace(cfg, train=train)  # what runs is what config.yaml records
    prepare_run_dir(run_dir, resume=resume, force=force)
    torch.manual_seed(train.seed)
    model = fresh_like(ckpt)
    log(f"scratch ({budget} budget): {epochs} epochs from fresh weights, the architecture of {checkpoint}")
    return _train(model, cfg=cfg, train=train, stage="scratch", run_dir=run_dir, parent=checkpoint, resume=resume,
                  progress=progress, log=log)


def fresh_like(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's architecture with fresh weights: slimctl's families get the paper's init at
    these widths; torchvision/timm layers keep their constructors' init (resized ones PyTorch's
    default). The β-compensation terms start at zero: nothing was removed from a fresh network."""
    model = create_model(ckpt["arch"], int(ckpt["num_classes"]), widths=ckpt["widths"],
                         input_size=ckpt.get("input_size"), **ckpt["arch_args"])
    if not ckpt["arch"].startswith((TORCHVISION, TIMM)):
        init_paper_weights(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ConstantResponse):
                module.zero_()
    return model


def teacher_for(cfg: Config, ckpt: dict[str, Any], checkpoint: Path) -> Distill | None:
    """The teacher `finetune.distill` asks for (None when alpha is 0), on the CPU: its path, or by
    default the pruned checkpoint's parent (the sparse model it was pruned from)."""
    kd = cfg.finetune.distill
    if kd.alpha == 0:
        return None
    parent = ckpt.get("parent") if isinstance(ckpt.get("parent"), dict) else {}
    source = kd.teacher or parent.get("path")
    if not source:
        raise SlimctlError(f"finetune.distill: {checkpoint} records no parent to learn from; "
                           "set finetune.distill.teacher to a checkpoint")
    if not Path(source).exists():
        raise SlimctlError(f"finetune.distill.teacher {source} does not exist; set it to a slimctl checkpoint")
    teacher = model_from_checkpoint(load_checkpoint(Path(source)), source=str(source))
    classes = (teacher.arch_spec["num_classes"], ckpt["num_classes"])
    if classes[0] != classes[1]:
        raise SlimctlError(f"finetune.distill.teacher {source} predicts {classes[0]} classes, the model being "
                           f"fine-tuned {classes[1]}: distillation needs the same classes")
    return Distill(teacher=teacher, alpha=kd.alpha, temperature=kd.temperature, source=str(source))


def teacher_on_device(distill: Distill | None, device: torch.device, train: TrainConfig) -> Distill | None:
    """The teacher on the training device, eval mode, frozen (each torchrun rank holds its own copy)."""
    if distill is None:
        return None
    layout = torch.channels_last if train.channels_last else torch.preserve_format
    teacher = distill.teacher.to(device, memory_format=layout).eval().requires_grad_(False)
    return dataclasses.replace(distill, teacher=teacher)


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


def _recorded_config(ckpt: dict[str, Any], source: str) -> Config | None:
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


def prune_checkpoint(
    checkpoint: Path,
    out: Path | None,
    *,
    ratio: float | None = None,
    min_channels: int | None = None,
    round_to: int = 1,
    coupled: str = "keep",
    compensate: str = "exact",
    target: Target | None = None,
    evaluate_model: bool = True,
    recalibrate: int = 0,
    data_root: str | None = None,
    batch_size: int | None = None,
    force: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Global-threshold pruning of a checkpoint → a narrower checkpoint, a |γ| histogram, a summary.

    The ratio is `ratio`, or the smallest one that meets `target` (FLOPs or params), or the
    checkpoint config's prune.ratio. `compensate` (exact | bias | none): see slimctl.core.compensate.
    `recalibrate` > 0 re-estimates the pruned model's BN statistics on that many training images
    (slimctl.core.recalibrate); the checkpoint keeps them, and top-1 is reported before and after.
    """
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, source=str(checkpoint)).eval()
    cfg = _recorded_config(ckpt, str(checkpoint))
    if compensate not in COMPENSATE_MODES:
        raise SlimctlError(f"--compensate must be one of {', '.join(COMPENSATE_MODES)}, got {compensate!r}")
    if min_channels is None:
        min_channels = cfg.prune.min_channels if cfg else 1
    if out is not None:
        _check_output(out, checkpoint, force)
    recalibrator = (_recalibrator(cfg, str(checkpoint), recalibrate, resolve_device(device), data_root)
                    if recalibrate else None)
    groups = channel_groups(model, coupled=coupled)
    plan = _plan_for(model, groups, cfg, ratio=ratio, target=target, min_channels=min_channels, round_to=round_to,
                     compensate=compensate)
    ratio = plan.ratio
    if out is None:
        out = checkpoint.with_name(f"pruned-r{ratio:g}.pt")
        _check_output(out, checkpoint, force)
    pruned, notes, plan = applied_plan(model, plan, compensate=compensate)  # groups it could not compensate kept
    pruned.eval()
    exactness = measure_exactness(model, pruned, plan, compensate)

    result: dict[str, Any] = {
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
    test_set = None
    if evaluate_model and cfg is not None:
        try:
            test_set = TestSet(cfg, resolve_device(device), data_root, batch_size=batch_size)
        except SlimctlError as exc:
            result["eval_skipped"] = str(exc)
    result.update(_pruned_scores(model, plan, pruned, compensate, test_set, recalibrator))
    result["coupled"] = coupled
    prune_info = {k: result[k] for k in ("ratio", "threshold", "min_channels", "round_to", "coupled", "compensate",
                                         "recalibrated_images", "target", "layers", "exactness")}
    metrics = {k: result[k] for k in ("params", "flops", "top1") if result[k] is not None}
    save_checkpoint(out, make_checkpoint(pruned.cpu(), stage="prune", config=ckpt.get("config"), parent=checkpoint,
                                         metrics=metrics, prune=prune_info))
    histogram = out.with_name(out.stem + "_gamma.png")
    scores = torch.cat([group_scores(model, g) for g in groups])
    plot_gamma_histogram(scores, plan.threshold, histogram, title=f"|γ| of {checkpoint.name}, ratio {ratio}")
    result.update(out=str(out), histogram=str(histogram))
    return result


def sweep_checkpoint(
    checkpoint: Path,
    *,
    ratios: list[float],
    compare: Path | None = None,
    tolerance: float = 0.5,
    subset: int | None = None,
    compensate: str = "exact",
    recalibrate: int = 0,
    min_channels: int = 1,
    round_to: int = 1,
    coupled: str = "keep",
    data_root: str | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    png: Path | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Top-1 right after pruning at each ratio (compensated and literal), for CHECKPOINT and, with
    `compare`, another model (e.g. its λ = 0 baseline); the largest ratio within `tolerance` points
    (of the recalibrated curve when `recalibrate` > 0 training images re-estimate BN statistics)."""
    if compensate not in COMPENSATE_MODES:
        raise SlimctlError(f"--compensate must be one of {', '.join(COMPENSATE_MODES)}, got {compensate!r}")
    if subset is not None and subset < 1:
        raise SlimctlError(f"--subset must be >= 1, got {subset}")
    if png is not None and png.suffix.lower() != ".png":
        raise SlimctlError(f"--png {png}: the figure is written as PNG; name it *.png")
    modes = tuple(dict.fromkeys((compensate, "none")))
    safe_by = f"{compensate}_recal" if recalibrate else compensate
    curves = {}
    for path in [checkpoint] + ([compare] if compare is not None else []):
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, source=str(path)).eval()
        cfg = _recorded_config(ckpt, str(path))
        if cfg is None:
            raise SlimctlError(f"{path} records no config, so slimctl does not know its data set; sweep needs data")
        try:
            test_set = TestSet(cfg, resolve_device(device), data_root, subset, batch_size)
        except SlimctlError as exc:
            raise SlimctlError(f"sweep needs the test set: {exc} (point at it with --data-root DIR)") from None
        recalibrator = (_recalibrator(cfg, str(path), recalibrate, resolve_device(device), data_root)
                        if recalibrate else None)
        unpruned = test_set.top1(model)[1]
        rows = sweep_model(model, channel_groups(model, coupled=coupled), ratios, lambda m: test_set.top1(m)[1],
                           modes=modes, min_channels=min_channels, round_to=round_to, on_ratio=progress,
                           recalibrate=recalibrator)
        curves[str(path)] = {
            "top1_unpruned": unpruned, "params": count_params(model), "flops": count_flops(model),
            "rows": rows, "largest_safe_ratio": largest_safe_ratio(rows, unpruned, tolerance, safe_by),
        }
    result = {"checkpoint": str(checkpoint), "compare": None if compare is None else str(compare),
              "compensate": compensate, "recalibrated_images": recalibrator.images if recalibrate else 0,
              "safe_by": safe_by,
              "tolerance": tolerance, "subset": subset, "images": test_set.loader.dataset_size, "curves": curves}
    if png is not None:
        plot_sweep(curves, png, modes=modes + ((safe_by,) if recalibrate else ()),
                   title=f"top-1 right after pruning ({result['images']} test images)")
        result["png"] = str(png)
    return result


def _plan_for(model: nn.Module, groups, cfg: Config | None, *, ratio: float | None, target: Target | None,
              min_channels: int, round_to: int, compensate: str):
    """The plan of `ratio`, of the smallest ratio meeting `target`, or of the config's prune.ratio."""
    if ratio is not None and target is not None:
        raise SlimctlError("give either --ratio or a --target-flops/--target-params, not both")
    if target is not None:
        return plan_for_target(model, groups, target, min_channels=min_channels, round_to=round_to,
                               compensate=compensate)[0]
    if ratio is None:
        ratio = cfg.prune.ratio if cfg else None
        if ratio is None:
            raise SlimctlError("--ratio is required (the checkpoint records no prune.ratio)")
    validate_ratio(ratio)
    return make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to)


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
    if out.exists() and not force:
        raise SlimctlError(f"{out} already exists; pass --force to replace it or -o to write elsewhere")
    if out.resolve() == checkpoint.resolve():
        raise SlimctlError("-o must differ from the input checkpoint")


def _constant_note(group) -> str | None:
    """Which declared consumers removed channels do not reach as a constant (no β compensation there)."""
    names = [c.module for c in group.consumers if not c.constant]
    return f"not reached as a constant: {', '.join(names)} (no β compensation)" if names else None


def explain_groups(model: nn.Module, *, coupled: str = "keep") -> list[dict[str, Any]]:
    """One row per channel space: kind, width, members, ranking BNs, and why a space keeps its width."""
    declare = getattr(model, "channel_groups", None)
    if declare is not None:  # a family's hand-declared groups
        return [
            {"kind": "selection" if g.selection else "free", "width": int(group_scores(model, g).numel()),
             "bns": list(g.bns), "members": [*g.producers, *(c.module for c in g.consumers)]
             + ([g.selection] if g.selection else []), "pruned": True, "reason": None,
             "constant_note": _constant_note(g)}
            for g in declare()
        ]
    return space_rows(trace_model(model, coupled=coupled))


def evaluate_checkpoint(checkpoint: Path, *, device: str = "cpu", data_root: str | None = None,
                        batch_size: int | None = None) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, source=str(checkpoint))
    cfg = _recorded_config(ckpt, str(checkpoint))
    if cfg is None:
        raise SlimctlError(f"{checkpoint} records no config, so slimctl does not know its data set")
    loss, top1 = TestSet(cfg, resolve_device(device), data_root, batch_size=batch_size).top1(model)
    return {"top1": top1, "loss": loss, "params": count_params(model), "flops": count_flops(model), "data": cfg.data.name}


def lineage(checkpoint: Path) -> list[dict[str, Any]]:
    """The checkpoint and its recorded parents (those still on disk), oldest first."""
    rows = []
    path: Path | None = checkpoint
    seen = set()
    while path is not None and path.exists() and path.resolve() not in seen:
        seen.add(path.resolve())
        ckpt = load_checkpoint(path)
        metrics = ckpt.get("metrics") or {}
        if not all(isinstance(metrics.get(k), int) for k in ("params", "flops")):  # recorded by every stage
            model = model_from_checkpoint(ckpt, source=str(path))
            metrics = {**metrics, "params": count_params(model), "flops": count_flops(model)}
        env = metrics.get("environment")
        rows.append({"stage": ckpt["stage"], "path": str(path), "params": metrics["params"],
                     "flops": metrics["flops"], "top1": metrics.get("top1"),
                     "environment": env if isinstance(env, dict) else None})
        parent = ckpt.get("parent")
        path = Path(parent["path"]) if isinstance(parent, dict) and parent.get("path") else None
    return rows[::-1]
