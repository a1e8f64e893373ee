"""Pruned means faster? FLOPs cut against measured speed-up, slimctl beside Torch-Pruning.

    python scripts/bench_latency.py [--models resnet18,mobilenet_v2] [--runtimes torch,onnxruntime]
        [--batch-sizes 1,16] [--ratio 0.5] [--size 224] [--markdown FILE]

For each torchvision model (random weights, γ ~ U(0, 1) seeded: the structure and speed of a prune
do not need a trained model), in this one invocation:
  slimctl       `prune --ratio R` with the defaults (exact compensation, coupled channels kept)
  auto          the same with `--round-to auto` (per-layer counts chosen by timing, cached)
  latency       `prune --target-latency F`, F = the default prune's measured torch batch-1 time
                fraction (so it aims at the same speed by measurement instead of by γ alone)
  TP none / TP 8  Torch-Pruning (pip install torch-pruning; only this script uses it): BN-scale
                importance, global pruning, the final classifier ignored, its pruning ratio
                searched until its FLOPs match the slimctl default's within 1%; round_to None and 8
Every model is timed as deployed (BNs folded into the convs, eval, inference mode, fp32), under each
runtime and batch size, in alternating rounds with the unpruned model in the same process; the
speed-up is unpruned / pruned (median of medians). The table prints FLOPs removed and speed-ups.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import click
import torch
from torch import nn

from slimctl import (PruneOptions, count_flops, create_model, environment, fold_bn, latency_timer, load_model,
                     machine_label, make_checkpoint, parse_latency, prune_checkpoint, save_checkpoint)

MODELS = ("resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,regnet_x_400mf,resnext50_32x4d,"
          "densenet121,shufflenet_v2_x1_0")


def random_gammas(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g)
    return model.eval()


def torch_pruning(model: nn.Module, *, flops: int, size: int, round_to: int | None) -> nn.Module:
    """Torch-Pruning's BN-scale global pruning at the pruning ratio whose FLOPs match `flops` (±1%)."""
    import copy

    import torch_pruning as tp

    example = torch.zeros(1, 3, size, size)

    def pruned_at(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                      pruning_ratio=ratio, ignored_layers=head, round_to=round_to)
        pruner.step()
        return m.eval()

    low, high, best = 0.0, 0.95, None
    for _ in range(14):  # bisection on TP's ratio; its FLOPs fall as the ratio grows
        mid = (low + high) / 2
        candidate = pruned_at(mid)
        got = count_flops(candidate, (3, size, size))
        best = candidate if best is None or abs(got - flops) < abs(count_flops(best, (3, size, size)) - flops) else best
        if abs(got - flops) <= 0.01 * flops:
            return candidate
        low, high = (mid, high) if got > flops else (low, mid)
    return best


def timers(models: dict[str, nn.Module], *, runtime: str, batch_size: int, size: int) -> dict[str, Callable]:
    return {name: latency_timer(fold_bn(m), batch_size=batch_size, input_size=(3, size, size), runtime=runtime)
            for name, m in models.items()}


def speedups(models: dict[str, nn.Module], *, runtime: str, batch_size: int, size: int, rounds: int,
             repeats: int) -> dict[str, float]:
    """unpruned / variant latency for every variant, alternating `rounds` times (medians)."""
    clocks = timers(models, runtime=runtime, batch_size=batch_size, size=size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, clock in clocks.items():
            times[name].append(clock(repeats=repeats, warmup=2))
    base = statistics.median(times["unpruned"])
    return {name: base / statistics.median(t) for name, t in times.items() if name != "unpruned"}


def variants(name: str, *, ratio: float, size: int, seed: int, folder: Path, tp_settings: list[int | None]
             ) -> dict[str, nn.Module]:
    model = random_gammas(create_model(f"torchvision.{name}", 1000, input_size=(3, size, size)), seed)
    source = folder / f"{name}.pt"
    save_checkpoint(source, make_checkpoint(model, stage="sparse-train"))

    def slimctl_prune(tag: str, **kwargs: Any) -> nn.Module:
        options = PruneOptions(round_to=kwargs.pop("round_to", 1), speed_check=False)
        result = prune_checkpoint(source, folder / f"{name}-{tag}.pt", evaluate_model=False, force=True,
                                  options=options, **kwargs)
        if result["latency"] is not None:  # the prune's own alternating confirmation of its target
            record = result["latency"]
            click.echo(f"{name} {tag}: target {record['target_ms']:.3g} ms, confirmed {record['pruned_ms']:.3g} ms "
                       f"against {record['unpruned_ms']:.3g} ms ({'met' if record['met'] else 'missed'})", err=True)
        return load_model(folder / f"{name}-{tag}.pt")

    out = {"unpruned": model, "slimctl": slimctl_prune("default", ratio=ratio)}
    builders: dict[str, Callable[[], nn.Module]] = {"auto": lambda: slimctl_prune("auto", ratio=ratio, round_to="auto")}
    one = speedups({"unpruned": model, "slimctl": out["slimctl"]}, runtime="torch", batch_size=1, size=size,
                   rounds=1, repeats=5)["slimctl"]
    builders["latency"] = lambda: slimctl_prune("latency", target=parse_latency(f"{min(0.95, 1 / one):.3f}"))
    for round_to in tp_settings:
        builders[f"TP {round_to or 'none'}"] = lambda r=round_to: torch_pruning(
            model, flops=count_flops(out["slimctl"]), size=size, round_to=r)
    for tag, build in builders.items():
        try:
            out[tag] = build()
        except Exception as exc:  # noqa: BLE001 - one variant failing (e.g. a peer's tracer) keeps the others
            click.echo(f"{name} {tag}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", err=True)
    return out


@click.command()
@click.option("--models", default=MODELS, show_default=True, help="Comma-separated torchvision model names.")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="slimctl's prune ratio.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True, help="Input height = width.")
@click.option("--runtimes", default="torch,onnxruntime", show_default=True)
@click.option("--batch-sizes", default="1,16", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--no-torch-pruning", is_flag=True, help="Skip the Torch-Pruning columns.")
@click.option("--seed", default=0, show_default=True)
@click.option("--markdown", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(models: str, ratio: float, size: int, runtimes: str, batch_sizes: str, rounds: int, repeats: int,
         no_torch_pruning: bool, seed: int, markdown: Path | None) -> None:
    cells = [(r, int(b)) for r in runtimes.split(",") for b in batch_sizes.split(",")]
    tp_settings = [] if no_torch_pruning else [None, 8]
    header = ["model", "variant", "FLOPs removed", *(f"{r} bs {b}" for r, b in cells)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.split(","):
            found = variants(name, ratio=ratio, size=size, seed=seed, folder=Path(tmp), tp_settings=tp_settings)
            flops = count_flops(found["unpruned"])
            measured = {cell: speedups(found, runtime=cell[0], batch_size=cell[1], size=size, rounds=rounds,
                                       repeats=repeats) for cell in cells}
            for variant in [v for v in found if v != "unpruned"]:
                rows.append([name, variant, f"{100 * (1 - count_flops(found[variant]) / flops):.1f}%",
                             *(f"{measured[cell][variant]:.2f}×" for cell in cells)])
                click.echo(" | ".join(rows[-1]), err=True)
    machine = machine_label(environment(torch.device("cpu"), None))
    text = "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *rows])
    click.echo(f"speed-up = unpruned / pruned latency, BNs folded, fp32, {size}×{size}; {machine}\n\n{text}")
    if markdown is not None:
        markdown.write_text(f"{machine}\n\n{text}\n")


if __name__ == "__main__":
    main()
