"""The training stages as library calls: sparse_train, finetune, scratch.

Each takes explicit arguments and returns a JSON-able dict; the CLI only parses options and
prints. Checkpoints are the only thing passed between stages. All three share `_train` (loaders,
device, precision, fit, checkpoints), in named steps; the weights a run starts from (pretrained,
fresh, a distillation teacher) and the sparsity strength λ are decided here too. The run folder's
rules (refusing to mix runs, provenance, resuming) are slimctl.pipeline.runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl.base.device import environment, resolve_precision
from slimctl.base.groups import ranked_bns
from slimctl.base.files import file_sha256
from slimctl.base.inserted import ConstantResponse, reattach_selections
from slimctl.base.registry import TIMM, TORCHVISION, import_timm
from slimctl.core.flops import count_flops, count_params
from slimctl.core.sparsity import bn_scales, budget_warning, gamma_stats, l1_budget, sparsity_for_budget
from slimctl.data import build_loaders, input_size_of, num_classes_of
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.io.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from slimctl.io.config import Config, TrainConfig, save_config
from slimctl.io.validation import MAX_LR
from slimctl.models import create_model
from slimctl.models.layers import init_paper_weights
from slimctl.output.tblog import EpochBoard, tensorboard_available
from slimctl.io.lineage import lineage
from slimctl.pipeline.inspection import check_names
from slimctl.pipeline.runs import hold_run_dir, prepare_run_dir, provenance, rank0_log, resumed
from slimctl.train import distributed
from slimctl.train import Distill, RunIO, fit, lr_sum, milestone_epochs
from slimctl.trace import channel_groups


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
    return ranked_bns(channel_groups(model))


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
    train_loader, test_loader = _loaders(cfg, train, model, world, device)
    parent_sha256 = None if parent is None else file_sha256(parent)  # once, not at every save
    resume_state = None
    if resume:
        model, resume_state = resumed(cfg, run_dir, parent, parent_sha256)
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
    save = _checkpoint_saver(model, stage=stage, config=cfg.to_dict(), parent=parent, parent_sha256=parent_sha256,
                             info=info)
    with contextlib.ExitStack() as held:  # the run folder's lock and the TensorBoard writer, released at the end
        board = _open_run_dir(cfg, run_dir, stage=stage, strength=strength, environment=info["environment"],
                              is_main=world.is_main, gammas=dict(zip(gamma_names, gammas)), held=held)
        log(
            f"{stage}: {model.arch_spec['arch']} on {cfg.data.name} ({train_loader.dataset_size} train / "
            f"{test_loader.dataset_size} {'held-out' if cfg.data.holdout else 'test'} images), {device.type}, {dtype or torch.float32}, "
            f"{train.epochs} epochs, λ={strength['sparsity']:.4g}"
            + (f" ({term_label(train)} {strength['l1_budget']:.3g})" if strength["sparsity"] else "")
            + (f", {world.world_size} processes" if world.enabled else "")
            + f" → {run_dir}"
        )
        warning = budget_warning(strength["l1_budget"], gamma_stats(gammas)["gamma_mean_abs"])
        if warning and resume_state is None and train.regularizer == "l1":
            log(f"warning: {warning}")
        trained = _parallel(model, train, world, device)
        with out_of_memory_in_training(cfg, model, stage):
            result = fit(
                trained, train_loader, test_loader, train, sparsity=strength["sparsity"], gammas=gammas,
                device=device, dtype=dtype, resume_state=resume_state,
                distill=teacher_on_device(distill, device, train),
                io=RunIO(run_dir, save, progress=progress, log=log, is_main=world.is_main, on_epoch=board),
            )
    return {**info, "best_top1": result["best_top1"], "run_dir": str(run_dir), "best": str(run_dir / "best.pt")}


def _loaders(cfg: Config, train: TrainConfig, model: nn.Module, world, device: torch.device):
    """(train loader, test loader) of `cfg.data` for this rank, checked against the model's classes."""
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
    return train_loader, test_loader


def _checkpoint_saver(model: nn.Module, *, stage: str, config: dict[str, Any], parent: Path | None,
                      parent_sha256: str | None, info: dict[str, Any]):
    """fit's `save`: a checkpoint of `model` with this stage's record, `info` merged into its metrics."""

    def save(path: Path, trained: nn.Module, metrics: dict[str, Any], resume_info: dict[str, Any] | None) -> None:
        # `model`, not the wrapper being trained: DDP and torch.compile wrap it and share its parameters
        # and buffers (SyncBatchNorm conversion swaps its BN children in place, same state_dict keys).
        ckpt = make_checkpoint(
            model, stage=stage, config=config, parent=parent, parent_sha256=parent_sha256,
            metrics={**info, **metrics}, resume=resume_info,
        )
        save_checkpoint(path, ckpt)

    return save


def _open_run_dir(cfg: Config, run_dir: Path, *, stage: str, strength: dict[str, float], environment: dict[str, Any],
                  is_main: bool, gammas: dict[str, Any], held: contextlib.ExitStack) -> EpochBoard | None:
    """On rank 0: the run folder, held (a second writer is refused before it writes anything),
    with its config.yaml (provenance, stage, resolved sparsity, environment), and the TensorBoard
    writer when log.tensorboard asks for one; `held` releases both."""
    board = None
    if is_main:
        if cfg.log.tensorboard:
            tensorboard_available()  # before the folder exists: a missing extra leaves nothing behind
        # Created only now: a run refused earlier (bad data, a model too large) leaves no empty folder.
        run_dir.mkdir(parents=True, exist_ok=True)
        held.callback(hold_run_dir(run_dir))
        for stale in run_dir.glob(".*.tmp"):  # half-written by a run killed mid-save: no live writer now
            stale.unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml",
                    extra={"provenance": provenance(), "stage": stage, "sparsity_resolved": strength,
                           "environment": environment})
        if cfg.log.tensorboard:
            board = EpochBoard(run_dir / "tb", gammas, sparsity=strength["sparsity"])
            held.callback(board.close)
    return board


def _parallel(model: nn.Module, train: TrainConfig, world, device: torch.device) -> nn.Module:
    """The module fit trains: `model` itself, or under torchrun its DDP wrapper (SyncBatchNorm with train.sync_bn)."""
    trained = model
    if world.enabled:
        if train.sync_bn:  # BN statistics over the global batch, at one all-reduce per BN layer
            trained = reattach_selections(nn.SyncBatchNorm.convert_sync_batchnorm(trained))
        # λ·sign(γ) is added after backward(), i.e. after DDP's all-reduce: once per rank, not scaled.
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    return trained


def out_of_memory_in_training(cfg: Config, model: nn.Module, stage: str):
    """Out of memory in a training step becomes one line: the batch (and image) size, what to lower."""
    size = input_size_of(cfg.data)[-1] if cfg.data.name == "imagefolder" else None  # pixels; fixed 32 otherwise
    what = f"training {model.arch_spec['arch']} (batch size {cfg.data.batch_size}"
    what += f", image size {size})" if size else ")"
    # A fine-tuned model's widths come from its checkpoint: model.width does not apply there.
    lower = ["data.batch_size", *(["model.width"] if stage == "sparse-train" else []),
             *(["data.image_size"] if size else [])]
    return out_of_memory_as_error(what, " or ".join(lower))


def term_label(train: TrainConfig) -> str:
    """How the log names the sparsity term before its budget: `L1 budget` or `polarization t=…, …, budget`."""
    if train.regularizer == "l1":
        return "L1 budget"
    return f"polarization t={train.polarization_t:g}, γ in [0, {train.gamma_bound:g}], budget"


def sparsity_strength(train: TrainConfig, *, steps_per_epoch: int) -> dict[str, float]:
    """λ and the L1 budget λ·Σlr of this schedule; λ derived from `train.sparsity_budget` when set."""
    total_lr = lr_sum(lr=train.lr, milestones=milestone_epochs(train.milestones, train.epochs), decay=train.lr_decay,
                      epochs=train.epochs, steps_per_epoch=steps_per_epoch)
    if train.sparsity_budget is not None:
        sparsity = sparsity_for_budget(train.sparsity_budget, total_lr)
        if sparsity > MAX_LR:
            raise SlimctlError(f"train.sparsity_budget {train.sparsity_budget:g} over this schedule (Σ lr = "
                               f"{total_lr:.3g}) needs λ = {sparsity:.3g}, more than {MAX_LR:g}; lower the budget")
    else:
        sparsity = train.sparsity
    return {"sparsity": sparsity, "l1_budget": l1_budget(sparsity, total_lr), "lr_sum": total_lr}


def sparse_train(cfg: Config, run_dir: Path, *, resume: bool = False, force: bool = False, progress=None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train from scratch with the L1 penalty λ = train.sparsity on every ranked BN scale."""
    log = rank0_log(log)
    check_names(cfg)
    prepare_run_dir(run_dir, resume=resume, force=force)
    torch.manual_seed(cfg.train.seed)  # the initial weights are part of the recorded recipe
    own = {"args": cfg.model.args} if cfg.model.args else {}  # a user's model's constructor arguments
    model = create_model(cfg.model.arch, num_classes_of(cfg.data.name, cfg.data.root), width=cfg.model.width,
                         input_size=input_size_of(cfg.data), **own)
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
    check_same_holdout(cfg, ckpt, checkpoint)
    distill = teacher_for(cfg, ckpt, checkpoint)
    prepare_run_dir(run_dir, resume=resume, force=force)
    torch.manual_seed(cfg.finetune_train().seed)
    if distill is not None:
        log(f"distilling from {distill.source} (alpha {distill.alpha:g}, temperature {distill.temperature:g})")
    return _train(model, cfg=cfg, train=cfg.finetune_train(), stage="finetune", run_dir=run_dir,
                  parent=checkpoint, resume=resume, progress=progress, log=log, distill=distill)


def check_same_holdout(cfg: Config, ckpt: dict[str, Any], checkpoint: Path) -> None:
    """A run that continues from a checkpoint holds out the images its parent held out (data.holdout
    and data.seed): a different split would train on the images the parent was scored on."""
    data = ((ckpt.get("config") or {}).get("data") or {})
    recorded = (data.get("holdout"), data.get("seed", 0))
    if recorded[0] is None and cfg.data.holdout is None:
        return
    if recorded != (cfg.data.holdout, cfg.data.seed):
        raise SlimctlError(
            f"{checkpoint} was trained with data.holdout {recorded[0]} and data.seed {recorded[1]}, this config has "
            f"{cfg.data.holdout} and {cfg.data.seed}: the held-out images would leak into training; use the same "
            f"(--set data.holdout={'null' if recorded[0] is None else recorded[0]} --set data.seed={recorded[1]})")


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
    if not kd.teacher and file_sha256(source) != parent.get("sha256"):
        raise SlimctlError(f"finetune.distill: {source}, the parent {checkpoint} records, was replaced since it was "
                           "recorded (its sha256 differs); set finetune.distill.teacher to the checkpoint to learn from")
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
