"""Exactness measured, not assumed (slimctl.core.exactness): the number prune reports, where it starts
when it is off, and the sweep's warning."""

from __future__ import annotations

import pytest
import torch

from conftest import strongly_sparse
from slimctl.errors import SlimctlError
from slimctl.core.exactness import THRESHOLD, measure_exactness
from slimctl.models import create_model
from slimctl.core.surgery import apply_plan, prune_model
from slimctl.core.sweep import sweep_model, sweep_warnings
from slimctl.trace import channel_groups


@pytest.mark.parametrize("mode", ["exact", "none"])
def test_prune_model_returns_its_measured_exactness(mode: str) -> None:
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    result = prune_model(model, 0.5, compensate=mode)
    assert result.exactness.mode == mode and result.exactness.exact and result.exactness.warning() is None
    assert result.exactness.input_size == (3, 32, 32) and result.exactness.consumers == ()


def test_a_broken_promise_is_measured_and_traced_to_the_first_layer_that_breaks_it() -> None:
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    _, plan, *_ = prune_model(model, 0.5)
    literal = apply_plan(model, plan, compensate="none")  # dropped β responses, claimed as exact
    exactness = measure_exactness(model, literal, plan, "exact")
    assert exactness.max_rel_diff > THRESHOLD and not exactness.exact
    # where it starts: the first consumer of removed channels (conv0 feeds conv1), not every later layer
    assert exactness.consumers[0] == "features.conv1"
    assert "features.conv2" not in exactness.consumers  # its input already differed: inherited, not caused
    assert "first at 'features.conv1'" in exactness.warning() or "first at features.conv1" in exactness.warning()
    # `bias` promises no exactness: measured, never a warning
    biased = measure_exactness(model, literal, plan, "bias")
    assert biased.max_rel_diff > THRESHOLD and biased.warning() is None


def test_sweep_records_the_distance_per_mode_and_warns_when_it_fails(monkeypatch) -> None:
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    rows = sweep_model(model, channel_groups(model), [0.3, 0.5], lambda m: 0.0, modes=("exact", "none"))
    assert all(r["max_rel_diff_exact"] < THRESHOLD and r["max_rel_diff_none"] < THRESHOLD for r in rows)
    assert sweep_warnings({"curves": {"m.pt": {"rows": rows}}}) == []
    monkeypatch.setattr("slimctl.core.surgery.apply_compensation", lambda *args: None)
    rows = sweep_model(model, channel_groups(model), [0.5], lambda m: 0.0, modes=("exact", "none"))
    (line,) = sweep_warnings({"curves": {"m.pt": {"rows": rows}}})
    assert "--compensate exact" in line and "0.5" in line


class FixedReshape(torch.nn.Module):
    """A layer whose code reshapes to a channel count fixed at construction (timm's LambdaLayer does):
    the traced graph sees a view that keeps the channels, the pruned model then cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 4, 1)
        self.channels = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        n, _, h, w = y.shape
        return self.head(y.reshape(n, 8, h, w)).mean((2, 3))


def test_a_pruned_model_that_cannot_run_is_a_clear_refusal_not_a_traceback() -> None:
    model = strongly_sparse(FixedReshape())
    model.arch_spec = {"arch": None, "input_size": (3, 8, 8)}
    with pytest.raises(SlimctlError, match="the pruned model does not run"):
        prune_model(model, 0.5)
