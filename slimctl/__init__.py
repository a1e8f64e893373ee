"""slimctl: network slimming (Liu et al., ICCV 2017) as a train → prune → fine-tune pipeline.

The public API (docs/api.md); scripts and docs use these names, not the modules behind them:

    create_model(arch, num_classes, ...)            a slimctl family, torchvision.<name> or timm.<name>
    channel_groups(model, coupled="keep")            what pruning shrinks: declared, else traced
    prune_model(model, ratio, ...)                   (narrower model, plan, exactness, notes)
    apply_plan(model, plan, compensate="exact")      a plan (e.g. make_plan's) applied: the narrower model
    make_plan(model, groups, ratio, ...)             one global |γ| threshold → the channels kept per group
    removed_positions(model, plan)                   BN name → the channels a plan removes
    measure_exactness(model, pruned, plan, mode)     the pruned model against what its mode promises
    fold_bn(model)                                   an eval-mode copy with each BN folded into its conv
    recalibrate_bn(model, loader, device=...)        BN statistics re-estimated (forward passes only)
    count_params(model), count_flops(model)          the paper's counts
    load_model(path), save_model(model, path, ...)   self-describing checkpoints, no pickled code
    load_checkpoint(path), make_checkpoint(model, stage=...), save_checkpoint(path, checkpoint)
    export_checkpoint(checkpoint, out, fmt=...)      ONNX / TorchScript / pt2 with a parity check
    SlimctlError                                     bad input: one line (the CLI's exit 2)

The package, bottom up (each layer imports only itself and the layers below; tests/test_layering.py):
errors and _version; base (vocabulary); models and trace; core (pruning); io (configs,
checkpoints); data; train; output (tables, figures, progress); pipeline (stages, bench, export);
cli, and this API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimctl._version import __version__
from slimctl.core.compensate import removed_positions
from slimctl.core.exactness import Exactness, measure_exactness
from slimctl.core.flops import count_flops, count_params
from slimctl.core.fold import fold_bn
from slimctl.core.plan import ChannelPlan, make_plan
from slimctl.core.recalibrate import recalibrate_bn
from slimctl.core.surgery import Pruned, apply_plan, prune_model
from slimctl.errors import SlimctlError
from slimctl.io.checkpoint import load_checkpoint, load_model, make_checkpoint, save_checkpoint
from slimctl.models import create_model
from slimctl.pipeline.export import export_checkpoint
from slimctl.trace import channel_groups


def save_model(model: nn.Module, path: str | Path, *, stage: str = "prune", **record: Any) -> None:
    """Write `model` (one `create_model` built, pruned or not) as a self-describing checkpoint that
    `load_model` rebuilds without the model's code being pickled; `record`: the other
    `make_checkpoint` fields (config, parent, metrics, prune)."""
    save_checkpoint(path, make_checkpoint(model, stage=stage, **record))


__all__ = [
    "ChannelPlan", "Exactness", "Pruned", "SlimctlError", "__version__", "apply_plan", "channel_groups",
    "count_flops", "count_params", "create_model", "export_checkpoint", "fold_bn", "load_checkpoint", "load_model",
    "make_checkpoint", "make_plan", "measure_exactness", "prune_model", "recalibrate_bn", "removed_positions",
    "save_checkpoint", "save_model",
]
