"""Shared fixtures: tiny models and tiny runs, CPU only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

# A seconds-long version of the demo: few samples, one epoch, fp32 for exact comparisons.
TINY = (
    "train.epochs=1",
    "finetune.epochs=1",
    "data.subset=96",
    "data.batch_size=32",
    "train.precision=fp32",
    "train.device=cpu",
)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """γ ~ U(0,1), β ~ N(0,0.1), running stats random: every channel matters and differs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g)
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model


def masked_reference(model: nn.Module, plan) -> nn.Module:
    """The original with γ and β zeroed at every removed channel of every ranked BN."""
    ref = copy.deepcopy(model)
    for gp in plan.groups:
        bn = ref.get_submodule(gp.group.bn)
        removed = torch.ones(gp.total, dtype=torch.bool)
        removed[gp.keep] = False
        positions = torch.arange(gp.total)[removed]
        if gp.group.selection is not None:
            positions = model.get_submodule(gp.group.selection).indices[positions]
        bn.weight.data[positions] = 0
        bn.bias.data[positions] = 0
    return ref


@pytest.fixture
def tiny_overrides() -> tuple[str, ...]:
    return TINY


@pytest.fixture
def one_thread():
    """Many small ops: one thread is faster than fighting other work for 2 cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
