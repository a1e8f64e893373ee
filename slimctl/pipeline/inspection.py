"""The inspecting stages as library calls: evaluate_checkpoint, model_summary, explain_groups,
and check_names, the config check every training stage runs first.

Each takes explicit arguments and returns a JSON-able value; the CLI only parses options and
prints. Nothing here writes: a checkpoint is read, measured, or followed to its parents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimctl.base.device import resolve_device
from slimctl.core.flops import count_flops, count_params
from slimctl.core.plan import group_scores
from slimctl.data import DATASETS
from slimctl.errors import SlimctlError
from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.io.config import Config
from slimctl.base.registry import is_import_path
from slimctl.models import is_known_arch, list_models, module_widths
from slimctl.pipeline.pruning import TestSet, recorded_config
from slimctl.trace import channel_groups, space_rows, trace_model


def check_names(cfg: Config) -> None:
    """The names a config uses exist: its arch in the model registry, its data set in slimctl.data."""
    if not is_known_arch(cfg.model.arch):
        raise SlimctlError(f"config key 'model.arch' must be one of {', '.join(list_models())} or "
                           f"torchvision.<name>, timm.<name> or package.module:ClassName, got {cfg.model.arch!r}")
    if cfg.model.args and not is_import_path(cfg.model.arch):
        raise SlimctlError(f"config key 'model.args' is for your own model (model.arch: package.module:ClassName); "
                           f"{cfg.model.arch} takes model.width")
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
    cfg = recorded_config(ckpt, str(checkpoint))
    if cfg is None:
        raise SlimctlError(f"{checkpoint} records no config, so slimctl does not know its data set")
    loss, top1 = TestSet(cfg, resolve_device(device), data_root, batch_size=batch_size).top1(model)
    return {"top1": top1, "loss": loss, "params": count_params(model), "flops": count_flops(model), "data": cfg.data.name}
