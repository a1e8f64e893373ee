"""slimctl export: ONNX / TorchScript / pt2 artifacts that match the checkpoint and carry its record."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from conftest import randomize_bn, run
from slimctl import load_model, make_checkpoint, prune_model, save_checkpoint
from slimctl.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_checkpoint(tmp_path, arch: str, *, ratio: float = 0.5, **kwargs):
    """A pruned (β-compensated) checkpoint of `arch` with random BN statistics."""
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, 10, input_size=(3, 32, 32), **kwargs)).eval()
    pruned, _, *_ = prune_model(model, ratio)
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, make_checkpoint(pruned, stage="prune", metrics={"top1": 61.5}))
    return path


def run_artifact(path, x: torch.Tensor) -> torch.Tensor:
    """The artifact in its own runtime, as a user without slimctl would run it."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if path.suffix == ".ts":
            return torch.jit.load(str(path))(x)
        return torch.export.load(str(path)).module()(x)


def check_artifact(artifact, checkpoint, batch: int = 5) -> None:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = load_model(checkpoint)(x)
    got = run_artifact(artifact, x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


# Representative families: plain, selections (pre-activation), concatenation, torchvision residual,
# inverted residual with depthwise convs, grouped convs.
MODELS = [
    ("vgg11", {"width": 0.25}),
    ("preresnet", {"depth": 20, "width": 0.5}),
    ("densenet", {"depth": 10, "growth": 6}),
    ("torchvision.resnet18", {}),
    ("torchvision.mobilenet_v2", {}),
    ("torchvision.shufflenet_v2_x0_5", {}),
]


@pytest.mark.parametrize("arch, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_export_of_each_family_matches_the_checkpoint_in_onnxruntime(tmp_path, arch, kwargs):
    checkpoint = pruned_checkpoint(tmp_path, arch, **kwargs)
    out = tmp_path / "model.onnx"
    result = json.loads(run("export", checkpoint, "-o", out, "--json").output)
    assert result["format"] == "onnx" and result["max_rel_diff"] < 1e-4 and result["folded_bn"]
    check_artifact(out, checkpoint)  # another batch size than the parity check's: the batch is dynamic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "pruned.pt"]  # no temp file left


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".ts"), ("pt2", ".pt2")])
@pytest.mark.parametrize("arch, kwargs", MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_torchscript_and_pt2_exports_match_and_load_without_slimctl(tmp_path, fmt, suffix, arch, kwargs):
    checkpoint = pruned_checkpoint(tmp_path, arch, **kwargs)
    result = json.loads(run("export", checkpoint, "--format", fmt, "--json").output)
    out = checkpoint.with_suffix(suffix)
    assert result["out"] == str(out) and result["max_rel_diff"] < 1e-4
    check_artifact(out, checkpoint)


def test_folding_leaves_no_bn_in_vgg_and_keeps_the_output(tmp_path):
    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    folded = json.loads(run("export", checkpoint, "-o", tmp_path / "f.pt2", "--json").output)
    kept = json.loads(run("export", checkpoint, "-o", tmp_path / "k.pt2", "--no-fold-bn", "--json").output)
    assert folded["bn_left"] == 0 and kept["bn_left"] == 8
    check_artifact(tmp_path / "f.pt2", checkpoint)


def test_the_record_travels_inside_and_info_reads_it_back(tmp_path):
    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    for name in ("m.onnx", "m.ts", "m.pt2"):
        run("export", checkpoint, "-o", tmp_path / name)
        record = json.loads(run("info", tmp_path / name, "--json").output)
        params = sum(p.numel() for p in load_model(checkpoint).parameters())
        assert (record["arch"], record["params"], record["top1"], record["stage"]) == ("vgg11", params, 61.5, "prune")
        assert record["input_size"] == [3, 32, 32] and record["widths"]["features.conv0"][0] < 64 / 4 + 1
        assert record["lineage"][-1]["stage"] == "prune"
        assert "vgg11" in run("info", tmp_path / name).output


def test_info_reads_an_archive_record_without_loading_the_archive(tmp_path, monkeypatch):
    """A crafted .pt2/.ts could run code when loaded (its pickles): info reads only the zip entry."""
    import zipfile

    import pickle
    import os

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    record = {"slimctl_version": "0.1.0", "arch": "vgg11", "stage": "prune", "params": 10, "flops": 20}
    for name in ("evil.pt2", "evil.ts"):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("evil/data.pkl", pickle.dumps(Payload()))
            archive.writestr("evil/extra/slimctl.json", json.dumps(record))

        def refuse(*args, **kwargs):
            raise AssertionError("the archive was loaded")

        monkeypatch.setattr(torch.export, "load", refuse)
        monkeypatch.setattr(torch.jit, "load", refuse)
        shown = json.loads(run("info", tmp_path / name, "--json").output)
        assert shown["arch"] == "vgg11" and shown["format"] in ("pt2", "torchscript")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    assert "cannot read it as pt2" in run("info", tmp_path / "junk.pt2", code=2).output


def test_a_static_batch_artifact_takes_only_the_traced_batch(tmp_path):
    import onnxruntime

    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    result = json.loads(run("export", checkpoint, "-o", tmp_path / "s.onnx", "--static-batch", "--json").output)
    assert result["batch"] == "static"
    session = onnxruntime.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2


def test_a_parity_failure_is_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    from slimctl.pipeline import export

    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    monkeypatch.setitem(export.RUNNERS, "pt2", lambda path, x: torch.zeros(x.shape[0], 10))  # a broken runtime
    result = run("export", checkpoint, "-o", tmp_path / "m.pt2", code=2)
    assert "exported output 'logits' differs from the checkpoint's" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.pt"]


# --------------------------------------------------------------------------- bad input


def test_bad_export_input_is_exit_2_with_one_line(tmp_path):
    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    (tmp_path / "there.onnx").write_bytes(b"keep me")
    cases = [
        (("export", tmp_path / "missing.pt"), "missing.pt"),
        (("export", checkpoint, "-o", tmp_path / "there.onnx"), "already exists; pass --force"),
        (("export", checkpoint, "--input-size", "3,2,2"), "input size 3,2,2 does not fit this model"),
        (("export", checkpoint, "--input-size", "3,32"), "--input-size expects C,H,W"),
        (("export", checkpoint, "-o", tmp_path / "x.ts", "--format", "onnx"), "suffix of another format"),
        (("export", checkpoint, "--format", "keras"), "Invalid value for '--format'"),
        (("export", tmp_path / "there.onnx"), "there.onnx"),  # not a slimctl checkpoint
        (("info", tmp_path / "there.onnx"), "there.onnx"),  # not an exported artifact
    ]
    for args, message in cases:
        result = run(*args, code=2)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert (tmp_path / "there.onnx").read_bytes() == b"keep me"
    assert not (tmp_path / "pruned.onnx").exists()


def test_onnx_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = run("export", checkpoint, code=2)
    assert "pip install 'slimctl[export]'" in result.output


# --------------------------------------------------------------------------- bench in onnxruntime


def test_bench_times_both_runtimes_with_speedups_within_each(tmp_path):
    full = tmp_path / "full.pt"
    torch.manual_seed(0)
    save_checkpoint(full, make_checkpoint(randomize_bn(create_model("vgg11", 10, width=0.25)), stage="sparse-train"))
    pruned = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    rows = json.loads(run("bench", full, pruned, "--batch-sizes", "1", "--repeats", "2", "--runtime",
                          "torch,onnxruntime", "--threads", "1", "--json").output)
    assert [(r["runtime"], r["checkpoint"] == str(pruned)) for r in rows] == \
        [("torch", False), ("torch", True), ("onnxruntime", False), ("onnxruntime", True)]
    assert rows[2]["speedup"] == 1.0 and rows[3]["speedup"] == pytest.approx(rows[2]["latency_ms"] / rows[3]["latency_ms"])
    result = run("bench", pruned, "--runtime", "tensorrt", code=2)
    assert "unknown runtime tensorrt" in result.output


def test_info_on_an_artifact_with_a_partial_record_is_one_line(tmp_path):
    import onnx

    checkpoint = pruned_checkpoint(tmp_path, "vgg11", width=0.25)
    run("export", checkpoint, "-o", tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key in ("slimctl_version", "arch")]
    del model.metadata_props[:]
    for key, value in kept + [("lineage", "[1, 2]")]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(tmp_path / "partial.onnx"))
    for extra in ((), ("--json",)):
        result = run("info", tmp_path / "partial.onnx", *extra, code=2)
        assert "its slimctl record is incomplete or altered" in result.output and "Traceback" not in result.output
