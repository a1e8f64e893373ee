"""The public API (slimctl.__all__, docs/api.md): every name resolves, and its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import slimctl
from conftest import strongly_sparse

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves_and_the_api_page_documents_it() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    for name in slimctl.__all__:
        assert getattr(slimctl, name) is not None
        if not name.startswith("_") and name not in ("ChannelPlan", "Exactness", "Pruned"):
            assert re.search(rf"`{name}\(", page) or f"`{name}`" in page, f"{name} is not in docs/api.md"


def test_the_api_round_trip(tmp_path) -> None:
    model = strongly_sparse(slimctl.create_model("vgg11", 10, width=0.25))
    result = slimctl.prune_model(model, 0.5)
    assert result.exactness.exact and result.plan.kept < result.plan.total
    slimctl.save_model(result.model, tmp_path / "p.pt")
    loaded = slimctl.load_model(tmp_path / "p.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
        assert (slimctl.fold_bn(loaded)(x) - loaded(x)).abs().max() < 1e-4
    assert slimctl.count_params(loaded) < slimctl.count_params(model)
    # the two halves of prune_model, and the measurement, agree with it
    plan = slimctl.make_plan(model, slimctl.channel_groups(model), 0.5)
    again = slimctl.apply_plan(model, plan)
    assert slimctl.measure_exactness(model, again, plan, "exact").exact
    assert set(slimctl.removed_positions(model, plan)) <= {n for n, _ in model.named_modules()}
