"""slimctl's trainer (`slimctl.fit`) with plain torch DataLoaders (slimctl.data.PlainLoader)."""

from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import slimctl
from slimctl.data import PlainLoader


def dataset(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_fit_trains_from_plain_dataloaders(tmp_path):
    torch.manual_seed(0)
    model = slimctl.create_model("vgg11", 10, width=0.125)
    train = slimctl.load_config(None, ["train.epochs=2", "train.device=cpu", "train.precision=fp32"]).train
    saved = []
    io = slimctl.RunIO(run_dir=tmp_path, save=lambda path, m, metrics, resume: saved.append(path.name))
    gammas = slimctl.bn_scales(model, [g.bn for g in slimctl.channel_groups(model)])
    before = [g.detach().clone() for g in gammas]
    slimctl.fit(model, DataLoader(dataset(), batch_size=16, shuffle=True), DataLoader(dataset(32), batch_size=16),
                train, sparsity=1e-3, gammas=gammas, device=torch.device("cpu"), dtype=None, io=io)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["images_per_sec"] > 0 for r in rows)
    assert "last.pt" in saved and not all(torch.equal(a, b) for a, b in zip(before, gammas))


def test_a_plain_loader_resumes_at_a_step_and_hands_the_epoch_to_its_sampler():
    data = dataset(40)
    loader = PlainLoader(DataLoader(data, batch_size=8), device=torch.device("cpu"))
    assert len(loader) == 5 and loader.num_samples == 40 and loader.dataset_size == 40
    loader.set_epoch(0, start_batch=2)
    resumed = [y for _, y in loader]
    assert len(resumed) == 3 and torch.equal(torch.cat(resumed), data.tensors[1][16:])
    assert len(list(loader)) == 5  # the skip applies to one pass only
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=0)
    sharded = PlainLoader(DataLoader(data, batch_size=8, sampler=sampler), device=torch.device("cpu"))
    assert sharded.num_samples == 20
    sharded.set_epoch(3)
    assert sampler.epoch == 3
