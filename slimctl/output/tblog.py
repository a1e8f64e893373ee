"""TensorBoard events for a run (optional: `pip install 'slimctl[tb]'`).

Per epoch: the metrics row as scalars, λ, and |γ| histograms (all ranked BNs together and per layer),
so γ's polarisation can be watched while λ is being chosen. `prune` adds its threshold and the
fraction of channels each layer keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimctl.errors import SlimctlError

# metrics.jsonl key → TensorBoard tag
SCALARS = {
    "train_loss": "train/loss",
    "train_top1": "train/top1",
    "test_loss": "test/loss",
    "test_top1": "test/top1",
    "lr": "lr",
    "images_per_sec": "images_per_sec",
    "gamma_mean_abs": "gamma/mean_abs",
    "gamma_frac_below_1e-2": "gamma/frac_below_1e-2",
    "gamma_frac_below_1e-3": "gamma/frac_below_1e-3",
}


def tensorboard_available() -> None:
    """Nothing, or the exit-2 message naming the extra to install."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
    except ImportError:
        raise SlimctlError(
            "TensorBoard logging needs the tensorboard package: pip install 'slimctl[tb]' "
            "(or leave out --tensorboard / set log.tensorboard: false)"
        ) from None


def summary_writer(log_dir: Path):
    """torch's SummaryWriter into `log_dir` (created), once the package is known to be there."""
    tensorboard_available()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class EpochBoard:
    """Writes one training run's events into `log_dir` (the run folder's tb/)."""

    def __init__(self, log_dir: Path, gammas: dict[str, nn.Parameter], *, sparsity: float) -> None:
        self.writer = summary_writer(log_dir)
        self.gammas, self.sparsity = gammas, sparsity

    def __call__(self, row: dict[str, Any]) -> None:
        """After each epoch: its metrics row (1-based `epoch` is the step) and the |γ| histograms."""
        step = row["epoch"]
        for key, tag in SCALARS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], step)
        self.writer.add_scalar("sparsity/lambda", self.sparsity, step)
        magnitudes = {name: g.detach().abs().float().cpu() for name, g in self.gammas.items()}
        self.writer.add_histogram("gamma/all", torch.cat(list(magnitudes.values())), step)
        for name, values in magnitudes.items():
            self.writer.add_histogram(f"gamma/layer/{name}", values, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_prune(log_dir: Path, result: dict[str, Any]) -> None:
    """A prune's threshold and each layer's kept fraction, at step = ratio in percent."""
    writer = summary_writer(log_dir)
    step = round(100 * result["ratio"])
    writer.add_scalar("prune/threshold", result["threshold"], step)
    writer.add_scalar("prune/params", result["params"], step)
    writer.add_scalar("prune/flops", result["flops"], step)
    if result.get("top1") is not None:
        writer.add_scalar("prune/top1", result["top1"], step)
    for layer in result["layers"]:
        writer.add_scalar(f"prune/kept/{layer['name']}", layer["kept"] / layer["total"], step)
    writer.close()
