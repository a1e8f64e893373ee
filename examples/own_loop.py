"""Network slimming in your own PyTorch loop: sparse-train, prune, save, with `slimctl.Slimming`.

    python examples/own_loop.py --epochs 20 --ratio 0.5 --out tinynet_pruned.pt
    PYTHONPATH=examples python -c "import slimctl; print(slimctl.load_model('tinynet_pruned.pt'))"
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import slimctl
from tinynet import TinyNet  # the model's own module: loading the saved file imports it again


def digits() -> TensorDataset:
    """scikit-learn's 1797 8×8 digits, as 3-channel images in [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    return TensorDataset(images, torch.tensor(data.target))


def train_and_prune(epochs: int, ratio: float, out: str, sparsity: float = 1e-3):
    """(the trained model, Pruned(model, plan, exactness, notes)); the pruned model saved to `out`."""
    torch.manual_seed(0)
    data = digits()
    model = TinyNet(num_classes=10)
    slim = slimctl.Slimming(model, data[:2][0], sparsity=sparsity)  # traces the channel groups once
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for epoch in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            slim.regularize(optimizer)  # grad(γ) += λ·sign(γ)
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, mean |γ| {slim.strength()['gamma_mean_abs']:.3f}")
    pruned = slim.prune(ratio=ratio)  # the trained model is left as it was
    print(f"kept {pruned.plan.kept}/{pruned.plan.total} channels; exact to {pruned.exactness.max_rel_diff:.1e}")
    slimctl.save_model(pruned.model, out)  # rebuilt from tinynet:TinyNet + the recorded widths
    return model, pruned


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="tinynet_pruned.pt")
    args = parser.parse_args()
    train_and_prune(args.epochs, args.ratio, args.out)
