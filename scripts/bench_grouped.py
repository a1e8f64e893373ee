"""Half a grouped convolution, two ways: the same number of channels in every group, or whole groups.

    python scripts/bench_grouped.py [--models regnet_x_400mf,resnext50_32x4d] [--batch-sizes 1,16]

For each distinct 3×3 grouped convolution of the torchvision models (G groups of g channels, at the
map size it runs at for a 224×224 input), three convs are timed, alternating round after round in
one process by `slimctl.latency_timer` (torch, inference mode, channels_last, fp32): the original;
half its channels with G groups of g/2 (what a plan keeping the same count in every group gives);
and half its groups, ⌊G/2⌋ groups of g (`--round-to auto`'s whole groups). The table shows the median
milliseconds and how much faster whole groups run than narrower groups (per group / whole groups).
Narrower groups remove more FLOPs (a quarter of the conv's multiply-adds are left, against a half):
the question is which a kernel library runs faster.
"""

from __future__ import annotations

import statistics

import click
import torch
import torchvision
from torch import nn

from slimctl import environment, latency_timer, machine_label


def grouped_shapes(name: str, size: int) -> list[tuple[int, int, int, int]]:
    """(channels, groups, stride, input map size) of each distinct 3×3 grouped conv of the model."""
    model = getattr(torchvision.models, name)().eval()
    shapes: dict[tuple[int, int, int, int], None] = {}

    def record(module: nn.Conv2d, args: tuple) -> None:
        shapes.setdefault((module.in_channels, module.groups, module.stride[0], args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)
             and 1 < m.groups < m.in_channels and m.kernel_size == (3, 3)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return [s for s in shapes if (s[0] // s[1]) % 2 == 0]  # groups whose width halves


def _conv(channels: int, groups: int, stride: int) -> nn.Module:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=groups, bias=False)


@click.command()
@click.option("--models", default="regnet_x_400mf,resnext50_32x4d", show_default=True)
@click.option("--batch-sizes", default="1,16", show_default=True)
@click.option("--size", default=224, show_default=True, help="Input image size the map sizes come from.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--repeats", default=20, show_default=True)
def main(models: str, batch_sizes: str, size: int, rounds: int, repeats: int) -> None:
    torch.manual_seed(0)
    rows = []
    for name in models.split(","):
        for channels, groups, stride, hw in grouped_shapes(name, size):
            g = channels // groups
            for batch in (int(b) for b in batch_sizes.split(",")):
                convs = {"original": _conv(channels, groups, stride),
                         "per group": _conv(channels // 2, groups, stride),
                         "whole groups": _conv(groups // 2 * g, groups // 2, stride)}
                timers = {k: latency_timer(c, batch_size=batch, input_size=(c.in_channels, hw, hw))
                          for k, c in convs.items()}
                times = {k: [] for k in timers}
                for _ in range(rounds):  # alternating: a noisy machine slows them alike
                    for k, timer in timers.items():
                        times[k].append(timer(repeats=repeats, warmup=3))
                ms = {k: statistics.median(v) for k, v in times.items()}
                rows.append(f"| {name} | {groups}×{g}, {hw}×{hw}, stride {stride} | {batch} | "
                            + " | ".join(f"{v:.3f}" for v in ms.values())
                            + f" | {ms['per group'] / ms['whole groups']:.2f}× |")
    click.echo(f"{machine_label(environment(torch.device('cpu'), None))}, torch, "
               f"median of {rounds} rounds × {repeats} passes\n")
    click.echo("| model | groups × width, map, stride | batch | original ms | per group ms | whole groups ms "
               "| per group / whole groups |")
    click.echo("|---|---|---|---|---|---|---|")
    click.echo("\n".join(rows))


if __name__ == "__main__":
    main()
