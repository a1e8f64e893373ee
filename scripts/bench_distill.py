"""What distillation costs: fine-tuning steps per second with and without the teacher.

    python scripts/bench_distill.py runs/cifar10-vgg19_w025/pruned-0.5.pt -c configs/cifar10_vgg19_w025.yaml

Both variants run in this one invocation on the same pruned model, batch size, precision and
memory layout (the config's `train`/`finetune` settings), with the teacher `finetune.distill`
names (default: the pruned checkpoint's parent). They alternate, round after round, so a noisy
shared machine slows both alike; the table shows the median round. Batches are random tensors on the
training device: the data loader costs the same with or without a teacher, so leaving it out
isolates what the teacher adds (images/s of a real run are a little lower for both).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import torch

from slimctl import (TrainStep, environment, load_checkpoint, load_config, load_model, machine_label, make_optimizer,
                     resolve_device, resolve_precision, teacher_for, teacher_on_device)


def steps_per_second(step: TrainStep, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Time `len(batches)` steps; the loss is read once at the end (as a training epoch does)."""
    start = time.perf_counter()
    total = torch.zeros((), device=device)
    for x, y in batches:
        total += step(x, y)[0]
    total.item()
    return len(batches) / (time.perf_counter() - start)


@click.command()
@click.argument("pruned", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-c", "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The recipe the fine-tune would use (precision, channels_last, lr, distill).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="finetune.distill.alpha (> 0).")
@click.option("--teacher", default=None, help="A teacher checkpoint [default: the config's, else the parent].")
@click.option("--batch-size", type=int, default=None, help="[default: the config's data.batch_size]")
@click.option("--image-size", type=int, default=32, show_default=True, help="Input height = width, pixels.")
@click.option("--steps", type=int, default=20, show_default=True, help="Timed steps per round and variant.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Alternating rounds; the median is shown.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed steps per variant first.")
def main(pruned: Path, config_path: str, alpha: float, teacher: str | None, batch_size: int | None,
         image_size: int, steps: int, rounds: int, warmup: int) -> None:
    if alpha <= 0:
        raise click.BadParameter("distillation needs alpha > 0", param_hint="--alpha")
    overrides = [f"finetune.distill.alpha={alpha}"] + ([f"finetune.distill.teacher={teacher}"] if teacher else [])
    cfg = load_config(config_path, overrides)
    train = cfg.finetune_train()
    device = resolve_device(train.device)
    dtype = resolve_precision(train.precision, device)
    layout = torch.channels_last if train.channels_last else torch.preserve_format
    ckpt = load_checkpoint(pruned)
    distill = teacher_on_device(teacher_for(cfg, ckpt, pruned), device, train)
    batch = batch_size or cfg.data.batch_size
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, image_size, image_size, generator=generator).to(device, memory_format=layout),
                torch.randint(0, ckpt["num_classes"], (batch,), generator=generator).to(device))
               for _ in range(steps)]

    def make_step(with_teacher: bool) -> TrainStep:
        model = load_model(pruned).train().to(device, memory_format=layout)
        optimizer, scaler = make_optimizer(model, lr=train.lr, momentum=train.momentum,
                                           weight_decay=train.weight_decay, device=device, dtype=dtype)
        return TrainStep(model, optimizer, gammas=[], sparsity=0.0, device=device, dtype=dtype, scaler=scaler,
                         distill=distill if with_teacher else None)

    variants = {"fine-tune": make_step(False), f"fine-tune + KD (alpha {alpha:g})": make_step(True)}
    for step in variants.values():
        steps_per_second(step, batches[:warmup], device)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            timings[name].append(steps_per_second(step, batches, device) * batch)

    print(f"\nfine-tuning {pruned} with teacher {distill.source}; batch {batch}, "
          f"{machine_label(environment(device, dtype))}, median of {rounds} rounds × {steps} steps\n")
    print("| variant | images/s | vs fine-tune |\n|---|---|---|")
    base = statistics.median(next(iter(timings.values())))
    for name, values in timings.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
