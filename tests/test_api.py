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


def slimctl_imports(path: Path) -> set[str]:
    """The slimctl modules a file imports, anywhere in it (lazy imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "slimctl"}


def test_scripts_use_only_the_public_api() -> None:
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) >= 8
    for script in scripts:
        assert slimctl_imports(script) <= {"slimctl"}, f"{script.name} imports {slimctl_imports(script)}"


def test_the_import_finder_sees_an_internal_import(tmp_path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from slimctl.core.plan import make_plan\n    import slimctl\n")
    assert slimctl_imports(script) == {"slimctl", "slimctl.core.plan"}


def test_latency_timer_times_a_model_and_refuses_an_unknown_runtime() -> None:
    import pytest

    model = slimctl.create_model("vgg11", 10, width=0.125)
    timer = slimctl.latency_timer(model, batch_size=2, input_size=(3, 32, 32))
    first, second = timer(repeats=2, warmup=1), timer(repeats=2, warmup=0)
    assert first > 0 and second > 0
    with pytest.raises(slimctl.SlimctlError, match="unknown runtime tensorrt"):
        slimctl.latency_timer(model, batch_size=1, runtime="tensorrt")


def test_every_code_block_of_the_api_page_runs(tmp_path, monkeypatch) -> None:
    """docs/api.md's Python blocks, in order, in one namespace, in a fresh folder (later blocks read
    the files earlier ones wrote)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert (tmp_path / "pruned.pt").exists() and (tmp_path / "vgg11_pruned.pt").exists()
