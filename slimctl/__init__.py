"""slimctl: network slimming (Liu et al., ICCV 2017) as a train → prune → fine-tune pipeline.

The public API (docs/api.md); scripts, docs and tests use these names, not the modules behind them.

Pruning
    create_model(arch, num_classes, ...)            a slimctl family, torchvision.<name>, timm.<name> or module:Class
    Slimming(model, example_input, sparsity=...)     in your own loop: .regularize(optimizer) each step, .prune(...)
    register_builder                                 decorator: a function of yours that may be named as an arch
    channel_groups(model, coupled="keep")            what pruning shrinks: declared, else traced
    explain_groups(model, coupled="keep")            one row per channel space: shrink, select or keep, and why
    group_scores(model, group)                       a group's per-channel |γ| (what the threshold ranks)
    prune_model(model, ratio, ...)                   (narrower model, plan, exactness, notes)
    apply_plan(model, plan, compensate="exact")      a plan (e.g. make_plan's) applied: the narrower model
    make_plan(model, groups, ratio, ...)             one global |γ| threshold → the channels kept per group
    removed_positions(model, plan)                   BN name → the channels a plan removes
    measure_exactness(model, pruned, plan, mode)     the pruned model against what its mode promises
    fold_bn(model)                                   an eval-mode copy with each BN folded into its conv
    recalibrate_bn(model, loader, device=...)        BN statistics re-estimated (forward passes only)
    count_params(model), count_flops(model)          the paper's counts
Checkpoints
    load_model(path), save_model(model, path, ...)   self-describing checkpoints, no pickled code
    load_checkpoint(path), make_checkpoint(model, stage=...), save_checkpoint(path, checkpoint)
    export_checkpoint(checkpoint, out, fmt=...)      ONNX / TorchScript / pt2 with a parity check
Measuring
    latency_timer(model, batch_size=..., runtime=...)  timer(repeats, warmup) → median ms per forward pass
    bench_checkpoints(paths, batch_sizes=..., ...)   what `slimctl bench` measures, as rows
    resolve_device(name), resolve_precision(name, device), environment(device, dtype), machine_label(env)
The CLI's stages and the trainer behind them
    load_config(path, overrides)                     a recipe, validated (what -c and --set give the CLI)
    sparse_train, finetune, prune_checkpoint(…, options=PruneOptions(...))
    parse_latency(text, runtime=..., ...)            a --target-latency for prune_checkpoint(target=...)
    parse_target(kind, text)                         a --target-flops / --target-params for prune_checkpoint
    Deploy(runtime=..., batch_size=...)              where prune's timings run (PruneOptions(deploy=...))
    load_dataset(name, root, ...), TensorLoader      the datasets and the on-device loader training uses
    fit(model, train_loader, test_loader, cfg.train, ..., io=RunIO(...))   the trainer (plain DataLoaders too)
    TrainStep, train_one_epoch, make_optimizer       the fused step (loss, L1 on γ, optimizer)
    bn_scales(model, bn_names)                       the γ parameters the L1 term acts on
    teacher_for(cfg, ckpt, path), teacher_on_device  the distillation teacher fine-tuning uses
    read_run(folder), markdown_table(runs), plot_runs, plot_gamma_comparison, atomic_write_text
SlimctlError                                         bad input: one line (the CLI's exit 2)

The package, bottom up (each layer imports only itself and the layers below; tests/test_layering.py):
errors and _version; base (vocabulary); models and trace; core (pruning); io (configs,
checkpoints); data; train; output (tables, figures, progress); pipeline (stages, bench, export);
cli, and this API.
"""

from __future__ import annotations

from slimctl._version import __version__
from slimctl.base.device import COMPILE_MODES, environment, machine_label, resolve_device, resolve_precision
from slimctl.base.files import atomic_write_text
from slimctl.base.registry import register_builder
from slimctl.core.compensate import COMPENSATE_MODES, removed_positions
from slimctl.core.exactness import Exactness, measure_exactness
from slimctl.core.flops import count_flops, count_params
from slimctl.core.fold import fold_bn
from slimctl.core.plan import ChannelPlan, group_scores, make_plan
from slimctl.core.recalibrate import recalibrate_bn
from slimctl.core.slimming import Slimming
from slimctl.core.sparsity import bn_scales
from slimctl.core.surgery import Pruned, apply_plan, prune_model
from slimctl.core.targets import parse_target
from slimctl.data import CIFAR_MEAN, CIFAR_STD, TensorLoader, load_dataset
from slimctl.errors import SlimctlError
from slimctl.io.checkpoint import load_checkpoint, load_model, make_checkpoint, save_checkpoint, save_model
from slimctl.io.config import load_config
from slimctl.models import create_model
from slimctl.output.report import plot_gamma_comparison, plot_runs
from slimctl.output.results import markdown_table, read_run
from slimctl.pipeline.bench import bench_checkpoints, latency_timer
from slimctl.pipeline.export import export_checkpoint
from slimctl.pipeline.inspection import explain_groups
from slimctl.pipeline.latency import Deploy, parse_latency
from slimctl.pipeline.pruning import PruneOptions, prune_checkpoint
from slimctl.pipeline.training import finetune, sparse_train, teacher_for, teacher_on_device
from slimctl.trace import channel_groups
from slimctl.train import RunIO, TrainStep, fit, make_optimizer, train_one_epoch

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "COMPENSATE_MODES", "COMPILE_MODES", "ChannelPlan", "Deploy", "Exactness", "PruneOptions",
    "Pruned", "RunIO", "SlimctlError", "Slimming", "TensorLoader", "TrainStep", "__version__", "apply_plan", "atomic_write_text",
    "bench_checkpoints", "bn_scales", "channel_groups", "count_flops", "count_params", "create_model",
    "environment", "explain_groups", "export_checkpoint", "finetune", "fit", "fold_bn", "group_scores", "latency_timer",
    "load_checkpoint", "load_config", "load_dataset", "load_model", "machine_label", "make_checkpoint",
    "make_optimizer", "make_plan", "markdown_table", "measure_exactness", "parse_latency", "parse_target",
    "plot_gamma_comparison",
    "plot_runs",
    "prune_checkpoint", "prune_model", "read_run", "recalibrate_bn", "register_builder", "removed_positions", "resolve_device",
    "resolve_precision", "save_checkpoint", "save_model", "sparse_train", "teacher_for", "teacher_on_device",
    "train_one_epoch",
]
