"""What β compensation costs at inference: the same prune with --compensate exact, bias and none.

    python scripts/bench_compensate.py runs/cifar10-vgg19_w025/e60/sparse-b2.0/best.pt --ratio 0.7
    python scripts/bench_compensate.py --arch torchvision.resnet50 --ratio 0.5 --runtime onnxruntime

One sparse checkpoint is pruned in memory at `--ratio` three times, once per compensation mode, so
the three models have the same widths and differ only in the added terms (`none`, the paper's
literal removal, is the baseline). Each is timed as users deploy it, with its BNs folded into the
convs where exact (`slimctl.fold_bn`), by `slimctl.latency_timer` (inference mode,
channels_last, autocast where it is the fast path). The modes alternate, round after round, so a
noisy shared machine slows them alike; the table shows the median round and the ratio to `none`.
FLOPs of the added terms: what `count_flops` counts beyond `none`'s (one add per output element of
each layer that still carries a response once folded).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import click
import torch

from slimctl import (COMPENSATE_MODES, apply_plan, count_flops, create_model, environment, fold_bn, latency_timer,
                     load_model, machine_label, prune_model, resolve_device, resolve_precision)


def synthetic_sparse(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN state with γ ≈ 0 on half of each BN's channels and β kept (what sparse training
    leaves): for timing, a model's structure matters, not its accuracy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1 + 0.5)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--arch", default=None, help="Instead of CHECKPOINT: this arch (e.g. vgg19, torchvision.resnet50) "
                                            "with random weights, half of each BN's γ ≈ 0.")
@click.option("--width", type=float, default=1.0, show_default=True, help="With --arch: slimctl families' width.")
@click.option("--ratio", type=click.FloatRange(0, 1, max_open=True), default=0.7, show_default=True)
@click.option("--batch-sizes", default="1,64", show_default=True, help="Comma-separated.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="auto", show_default=True, help="auto, bf16, fp16 or fp32.")
@click.option("--repeats", type=int, default=30, show_default=True, help="Forward passes per round (median).")
@click.option("--rounds", type=int, default=5, show_default=True, help="Alternating rounds; the median is shown.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: each model exported to ONNX, fp32, CPU (pip install 'slimctl[export]').")
def main(checkpoint: Path | None, arch: str | None, width: float, ratio: float, batch_sizes: str, device: str,
         precision: str, repeats: int, rounds: int, runtime: str) -> None:
    sizes = [int(b) for b in batch_sizes.split(",")]
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if (checkpoint is None) == (arch is None):
        raise click.UsageError("give a CHECKPOINT or --arch, not both")
    if arch is not None:
        args = {} if arch.startswith(("torchvision.", "timm.")) else {"width": width}
        model, checkpoint = synthetic_sparse(create_model(arch, 10, **args)), f"{arch} (random, half γ ≈ 0)"
    else:
        model = load_model(checkpoint).eval()
    size = tuple(model.arch_spec["input_size"])
    modes = ("none",) + tuple(m for m in COMPENSATE_MODES if m != "none")
    # One plan for all three (exact's: it keeps whole any group it cannot compensate), so the models
    # have the same widths and differ only in the added terms.
    plan = prune_model(model, ratio, compensate="exact").plan
    pruned = {mode: apply_plan(model, plan, compensate=mode).eval() for mode in modes}
    folded = {mode: fold_bn(m) for mode, m in pruned.items()}
    # the exact terms as hooks that add a cached map (what fold_bn leaves where no constant channel can carry them)
    folded["exact, hooked"] = fold_bn(pruned["exact"], carry_maps=False)
    modes = modes + ("exact, hooked",)
    flops = count_flops(pruned["none"])
    timings: dict[tuple[str, int], list[float]] = {(mode, b): [] for mode in modes for b in sizes}
    # Built (for onnxruntime: exported) once per (mode, batch), outside the rounds.
    timers = {(mode, b): latency_timer(folded[mode], batch_size=b, input_size=size, runtime=runtime, device=dev,
                                       dtype=dtype) for mode in modes for b in sizes}
    for _ in range(rounds):
        for b in sizes:
            for mode in modes:
                timings[mode, b].append(timers[mode, b](repeats=repeats, warmup=3))

    where = machine_label(environment(dev, dtype)) if runtime == "torch" else f"onnxruntime, fp32, {dev}"
    print(f"\n{checkpoint} pruned at {ratio:g} ({flops / 1e6:.2f}M FLOPs), BNs folded; "
          f"{where}, median of {rounds} rounds × {repeats} passes\n")
    print("| compensate | added FLOPs / image | " + " | ".join(f"bs {b}: ms (vs none)" for b in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    folded_none_flops = count_flops(folded["none"])
    for mode in modes:
        adds = count_flops(folded[mode]) - folded_none_flops
        cells = []
        for b in sizes:
            ms, base = statistics.median(timings[mode, b]), statistics.median(timings["none", b])
            cells.append(f"{ms:.3f} ({ms / base:.2f}×)")
        print(f"| {mode} | {adds:,} (+{100 * adds / flops:.2f}%) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
