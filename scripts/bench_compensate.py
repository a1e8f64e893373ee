"""What β compensation costs at inference: the same prune with --compensate exact, bias and none.

    python scripts/bench_compensate.py runs/cifar10-vgg19_w025/e60/sparse-b2.0/best.pt --ratio 0.7
    python scripts/bench_compensate.py --arch torchvision.resnet50 --ratio 0.5 --runtime onnxruntime

One sparse checkpoint is pruned in memory at `--ratio` three times, once per compensation mode, so
the three models have the same widths and differ only in the added terms (`none`, the paper's
literal removal, is the baseline). Each is timed as users deploy it, with its BNs folded into the
convs where exact (`slimctl.core.fold.fold_bn`), by `slimctl.pipeline.bench.latency_ms` (inference mode,
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

from slimctl.pipeline.bench import latency_ms, onnxruntime_latency_ms, onnxruntime_session
from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.core.compensate import COMPENSATE_MODES
from slimctl.base.device import environment, machine_label, resolve_device, resolve_precision
from slimctl.core.flops import count_flops
from slimctl.core.fold import fold_bn
from slimctl.models import create_model
from slimctl.base.registry import input_size
from slimctl.core.surgery import apply_plan, prune_model


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
        model = model_from_checkpoint(load_checkpoint(checkpoint), source=str(checkpoint)).eval()
    size = input_size(model)
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
    # Exported once per (mode, batch), outside the rounds.
    sessions = ({(mode, b): onnxruntime_session(folded[mode], batch_size=b, input_size=size)
                 for mode in modes for b in sizes} if runtime == "onnxruntime" else {})
    for _ in range(rounds):
        for b in sizes:
            for mode in modes:
                if runtime == "torch":
                    ms = latency_ms(folded[mode], batch_size=b, device=dev, dtype=dtype, repeats=repeats,
                                    input_size=size)
                else:
                    ms = onnxruntime_latency_ms(*sessions[mode, b], repeats=repeats, warmup=3)
                timings[mode, b].append(ms)

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
