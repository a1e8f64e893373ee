"""The commands that train: sparse-train, finetune, scratch."""

from __future__ import annotations

from pathlib import Path

import click

from slimctl.cli.common import _load_config, _print_best, cli, err_console, run_options
from slimctl.output.progress import reporter


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
