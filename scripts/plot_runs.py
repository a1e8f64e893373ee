"""Figures of one recipe folder (make cpu-repro writes them):

    python scripts/plot_runs.py RUNS/cifar10-vgg19_w025

- gamma_hist.png: |γ| of the baseline (λ = 0) vs the sparse-trained model — why λ matters;
- error_curves.png: test error per epoch of baseline, sparse-train and every finetune-<ratio>.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from slimctl import (SlimctlError, channel_groups, group_scores, load_checkpoint, load_model, plot_gamma_comparison,
                     plot_runs, read_run)

STAGES = ("baseline", "sparse")


def gamma_scores(checkpoint: Path) -> torch.Tensor:
    model = load_model(checkpoint)
    return torch.cat([group_scores(model, g) for g in channel_groups(model)])


def write_plots(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise SlimctlError(f"{folder} is not a recipe folder")
    scores = {
        f"{stage} (λ = {load_checkpoint(folder / stage / 'best.pt')['config']['train']['sparsity']:g})":
            gamma_scores(folder / stage / "best.pt")
        for stage in STAGES
        if (folder / stage / "best.pt").exists()
    }
    runs = [folder / s for s in STAGES] + sorted(folder.glob("finetune-*"))
    curves = [read_run(run) for run in runs if (run / "metrics.jsonl").exists()]
    if not scores and not curves:
        raise SlimctlError(f"{folder} holds no finished stages to plot")
    written = []
    if scores:
        plot_gamma_comparison(scores, folder / "gamma_hist.png", title=f"|γ| distribution, {folder.name}")
        written.append(folder / "gamma_hist.png")
    if curves:
        plot_runs(curves, folder / "error_curves.png", title=folder.name)  # what `slimctl compare --png` draws
        written.append(folder / "error_curves.png")
    return written


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
def main(folder: Path) -> None:
    try:
        for path in write_plots(folder):
            click.echo(path)
    except SlimctlError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
