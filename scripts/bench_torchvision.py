"""Network slimming on torchvision and timm CNNs: channel structure, pruned size and CPU latency per model.

    python scripts/bench_torchvision.py [--models resnet18,mobilenet_v2] [--size 224] [--markdown]
    python scripts/bench_torchvision.py --models timm.efficientnet_b0,timm.regnety_002 --coupled max

A bare name is a torchvision model; `timm.<name>` is a timm model (pip install 'slimctl[timm]').

For each model, in this one invocation: random BN scales (γ ~ U(0, 1), seeded — the structure of
a prune does not need a trained model), then
  BNs       BatchNorm2d layers in the model
  groups    from the traced channel spaces (`slimctl groups --explain`): shrink = spaces that
            become narrower (free, depthwise, grouped, coupled); select = BNs whose space keeps
            its width but whose consumers read only the kept channels (a selection); keep =
            spaces that keep their width (frozen, or residual-coupled under the paper's default
            `--coupled keep`) — a selection BN's space is counted there too
  params, FLOPs  before and after `slimctl prune --ratio 0.5` (FLOPs at --size, the paper's count)
  prune s   wall time of the prune stage as the CLI runs it (load, trace, plan, surgery, count,
            save, histogram), without the Python start-up
  latency   `slimctl bench` of the unpruned vs the pruned checkpoint (median ms per forward,
            inference mode, precision auto), and the speed-up measured in the same run
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from slimctl import (PruneOptions, SlimctlError, bench_checkpoints, create_model, explain_groups, make_checkpoint,
                     prune_checkpoint, resolve_precision, save_checkpoint)

MODELS = ("resnet18,resnet50,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,densenet121,vgg16_bn,googlenet,"
          "regnet_x_400mf,resnext50_32x4d,shufflenet_v2_x1_0")
SHRINK_KINDS = ("free", "depthwise", "grouped", "coupled")


def random_gammas(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g)


def space_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """shrink / select / keep counts of `explain_groups` rows."""
    return {"shrink": sum(r["pruned"] and r["kind"] in SHRINK_KINDS for r in rows),
            "select": sum(r["kind"] == "selection" for r in rows),
            "keep": sum(not r["pruned"] for r in rows)}


def measure(name: str, *, size: int, ratio: float, round_to: int, coupled: str, batch_sizes: list[int],
            repeats: int, seed: int, folder: Path) -> dict[str, Any]:
    arch = name if name.startswith(("torchvision.", "timm.")) else f"torchvision.{name}"
    model = create_model(arch, num_classes=1000, input_size=(3, size, size))
    random_gammas(model, seed)
    counts = space_counts(explain_groups(model, coupled=coupled))
    original, pruned = folder / f"{name}.pt", folder / f"{name}-pruned.pt"
    save_checkpoint(original, make_checkpoint(model, stage="sparse-train"))
    start = time.perf_counter()
    result = prune_checkpoint(original, pruned, ratio=ratio, evaluate_model=False, force=True,
                              options=PruneOptions(round_to=round_to, coupled=coupled))
    prune_s = time.perf_counter() - start
    device = torch.device("cpu")
    latency = bench_checkpoints([original, pruned], batch_sizes=batch_sizes, device=device,
                                dtype=resolve_precision("auto", device), repeats=repeats)
    return {
        "model": name, "bns": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()), **counts,
        "params_before": result["params_before"], "params": result["params"],
        "flops_before": result["flops_before"], "flops": result["flops"], "prune_s": prune_s,
        "latency": {r["batch_size"]: (latency[i]["latency_ms"], r["latency_ms"])
                    for i, r in enumerate(latency[len(batch_sizes):])},
    }


def _cut(before: int, after: int) -> str:
    return f"{before / 1e6:.2f}M → {after / 1e6:.2f}M (−{100 * (1 - after / before):.0f}%)"


def rows_as_cells(rows: list[dict[str, Any]], batch_sizes: list[int]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "BNs", "shrink / select / keep", "params", "FLOPs", "prune s",
              *(f"bs {b}: ms before → after" for b in batch_sizes)]
    cells = []
    for r in rows:
        lat = [f"{r['latency'][b][0]:.1f} → {r['latency'][b][1]:.1f} ({r['latency'][b][0] / r['latency'][b][1]:.2f}×)"
               for b in batch_sizes]
        cells.append([r["model"], str(r["bns"]), f"{r['shrink']} / {r['select']} / {r['keep']}",
                      _cut(r["params_before"], r["params"]), _cut(r["flops_before"], r["flops"]),
                      f"{r['prune_s']:.1f}", *lat])
    return header, cells


@click.command()
@click.option("--models", default=MODELS, show_default=True,
              help="Comma-separated model names: torchvision's (bare or torchvision.<name>) or timm.<name>.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Input height = width (pixels) for FLOPs, tracing and latency.")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Prune ratio.")
@click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True,
              help="Kept channels per group rounded up to a multiple of this (`slimctl prune --round-to`).")
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed forward passes per batch size (median reported).")
@click.option("--coupled", type=click.Choice(["keep", "max", "mean", "sum"]), default="keep", show_default=True,
              help="Residual-coupled channels: keep them (the paper), or prune each set together (`slimctl prune --coupled`).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random γ.")
@click.option("--markdown", is_flag=True, help="Print a markdown table (for the README) instead of a rich one.")
@click.option("--json-out", type=click.Path(path_type=Path), help="Also write the rows as JSON.")
def main(models: str, size: int, ratio: float, round_to: int, coupled: str, batch_sizes: str, repeats: int,
         seed: int, markdown: bool, json_out: Path | None) -> None:
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,16, got {batch_sizes!r}",
                                 param_hint="--batch-sizes") from None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.split(","):
            try:
                rows.append(measure(name, size=size, ratio=ratio, round_to=round_to, coupled=coupled,
                                    batch_sizes=sizes, repeats=repeats, seed=seed, folder=Path(tmp)))
            except SlimctlError as exc:
                raise click.BadParameter(f"{name}: {exc}", param_hint="--models") from None
            click.echo(f"{name}: done", err=True)
    header, cells = rows_as_cells(rows, sizes)
    if markdown:
        click.echo("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for c in cells:
            click.echo("| " + " | ".join(c) + " |")
    else:
        table = Table(title=f"prune ratio {ratio} (round-to {round_to}, coupled {coupled}), random γ, {size}×{size}, "
                            f"CPU ({torch.get_num_threads()} threads)")
        for column in header:
            table.add_column(column)
        for c in cells:
            table.add_row(*c)
        Console().print(table)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
