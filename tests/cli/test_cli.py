"""The CLI end to end on the demo config (tiny), and every bad-input case: exit 2, one message."""

import json

import pytest
import torch

from conftest import DEMO_CONFIG, TINY, run, sets
from slimctl.io.checkpoint import load_checkpoint


def _sets(*extra):
    return sets(*TINY, *extra)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """sparse-train → prune → finetune → prune again, on the tiny demo."""
    root = tmp_path_factory.mktemp("pipe")
    run("sparse-train", "-c", DEMO_CONFIG, "-o", root / "sparse", *_sets("train.epochs=2"))
    prune = run("prune", root / "sparse" / "best.pt", "--ratio", "0.5", "-o", root / "pruned.pt", "--json")
    run("finetune", root / "pruned.pt", "-c", DEMO_CONFIG, "-o", root / "ft", *_sets())
    prune2 = run("prune", root / "ft" / "best.pt", "--ratio", "0.3", "-o", root / "pruned2.pt", "--json")
    return root, json.loads(prune.output), json.loads(prune2.output)


def test_sparse_train_writes_the_run_folder(pipeline):
    root, _, _ = pipeline
    sparse = root / "sparse"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in sparse.iterdir()}
    rows = [json.loads(line) for line in (sparse / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    keys = {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "seconds", "images_per_sec",
            "gamma_mean_abs", "gamma_frac_below_1e-2"}
    assert keys <= set(rows[0])
    config = (sparse / "config.yaml").read_text()
    assert "sparsity_budget: 0.66" in config and "subset: 96" in config and "git_commit" in config
    best = load_checkpoint(sparse / "best.pt")
    assert best["stage"] == "sparse-train" and best["metrics"]["top1"] == max(r["test_top1"] for r in rows)


def test_prune_json_and_outputs(pipeline):
    root, result, _ = pipeline
    assert result["ratio"] == 0.5 and result["threshold"] > 0
    assert result["params"] < result["params_before"] and result["flops"] < result["flops_before"]
    assert all({"name", "kept", "total"} <= set(layer) for layer in result["layers"])
    assert sum(l["kept"] for l in result["layers"]) < sum(l["total"] for l in result["layers"])
    assert result["top1"] is not None  # digits are always available, so the pruned model was evaluated
    assert (root / "pruned_gamma.png").stat().st_size > 1000
    ckpt = load_checkpoint(root / "pruned.pt")
    assert ckpt["stage"] == "prune" and ckpt["parent"]["sha256"] and ckpt["prune"]["ratio"] == 0.5
    # exactness measured on every prune: in the JSON and in the checkpoint's prune record
    assert result["exactness"]["mode"] == "exact" and result["exactness"]["exact"]
    assert 0 <= result["exactness"]["max_rel_diff"] < 1e-4 and result["exactness_warning"] is None
    assert ckpt["prune"]["exactness"] == result["exactness"]


def test_prune_says_what_it_checked_and_warns_when_the_promise_fails(pipeline, monkeypatch):
    root, _, _ = pipeline
    checked = run("prune", root / "sparse" / "best.pt", "--ratio", "0.5", "-o", root / "checked.pt", "--no-eval")
    assert "checked: the pruned model computes the original with only the removed γ zeroed" in checked.output
    # a compensation that silently does nothing: the measurement names it, the run still succeeds
    monkeypatch.setattr("slimctl.core.surgery.apply_compensation", lambda *args: None)
    broken = run("prune", root / "sparse" / "best.pt", "--ratio", "0.5", "-o", root / "broken.pt", "--json")
    exactness = json.loads(broken.output)["exactness"]
    assert not exactness["exact"] and exactness["max_rel_diff"] > 1e-4 and exactness["consumers"]
    warned = run("prune", root / "sparse" / "best.pt", "--ratio", "0.5", "-o", root / "broken.pt", "--force",
                 "--no-eval")
    assert "warning:" in warned.output and "first at" in warned.output


def test_finetune_and_second_pass(pipeline):
    root, first, second = pipeline
    ft = load_checkpoint(root / "ft" / "best.pt")
    assert ft["stage"] == "finetune" and ft["config"]["finetune"]["epochs"] == 1
    assert second["params_before"] == first["params"]  # the second pass starts from the narrower model
    assert second["params"] < first["params"]


def test_eval_info_report(pipeline):
    root, first, _ = pipeline
    ev = json.loads(run("eval", root / "pruned.pt", "--json").output)
    assert ev["top1"] == pytest.approx(first["top1"]) and ev["params"] == first["params"]
    info = json.loads(run("info", root / "pruned.pt", "--json").output)
    assert info["params"] == first["params"] and info["flops"] == first["flops"]
    rows = json.loads(run("report", root / "pruned2.pt", "--json").output)
    assert [r["stage"] for r in rows] == ["sparse-train", "prune", "finetune", "prune"]
    for row in rows:  # (read from the recorded metrics) they match the model each checkpoint rebuilds
        rebuilt = json.loads(run("info", row["path"], "--json").output)
        assert (row["params"], row["flops"]) == (rebuilt["params"], rebuilt["flops"])
    assert rows[1]["params"] == first["params"] < rows[0]["params"]
    assert "slimming summary" in run("report", root / "ft" / "best.pt").output


def test_info_arch():
    info = json.loads(run("info", "--arch", "vgg19", "--json").output)
    assert info["params"] == 20_035_018 and info["flops"] == 797_304_842
    assert "features.bn0" in info["bn_widths"]


def test_help_explains_every_command():
    for command in ("sparse-train", "prune", "finetune", "eval", "info", "report"):
        assert "Usage" in run(command, "--help").output


# --------------------------------------------------------------------------- bad input


def expect_user_error(*args, match):
    result = run(*args, code=2)
    assert match in result.output
    assert "Traceback" not in result.output
    return result


def test_bad_ratio(pipeline):
    root, _, _ = pipeline
    for ratio in ("1.5", "1", "-0.2"):
        expect_user_error("prune", root / "sparse" / "best.pt", "--ratio", ratio, "-o", root / "x.pt",
                          match="must be in [0, 1)")
    assert not (root / "x.pt").exists()
    expect_user_error("prune", root / "sparse" / "best.pt", "--ratio", "abc", match="not a valid ratio")


def test_missing_unreadable_and_foreign_checkpoints(tmp_path):
    expect_user_error("prune", tmp_path / "nope.pt", "--ratio", "0.5", match="checkpoint not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not torch")
    for command in (("prune", garbage, "--ratio", "0.5"), ("eval", garbage), ("info", garbage)):
        expect_user_error(*command, match="not a readable slimctl checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    expect_user_error("eval", foreign, match="not a slimctl checkpoint")
    expect_user_error("info", tmp_path, match="is a folder")


def test_existing_outputs_are_never_overwritten(pipeline):
    root, _, _ = pipeline
    before = (root / "pruned.pt").read_bytes()
    expect_user_error("prune", root / "sparse" / "best.pt", "--ratio", "0.7", "-o", root / "pruned.pt",
                      match="already exists; pass --force")
    assert (root / "pruned.pt").read_bytes() == before
    last = (root / "sparse" / "last.pt").read_bytes()
    expect_user_error("sparse-train", "-c", DEMO_CONFIG, "-o", root / "sparse", *_sets(),
                      match="pass --resume to continue that run or --force")
    assert (root / "sparse" / "last.pt").read_bytes() == last


def test_config_errors(tmp_path):
    out = tmp_path / "run"
    expect_user_error("sparse-train", "-c", DEMO_CONFIG, "-o", out, "--set", "train.epoch=2",
                      match="unknown config key 'train.epoch'; did you mean 'train.epochs'")
    expect_user_error("sparse-train", "-c", DEMO_CONFIG, "-o", out, "--set", "train.lr=fast",
                      match="'train.lr' must be float")
    expect_user_error("sparse-train", "-c", tmp_path / "missing.yaml", match="config file not found")
    assert not out.exists()


def test_missing_dataset_without_download(tmp_path):
    result = expect_user_error(
        "sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "run",
        "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'empty'}", "--set", "data.download=false",
        match="cifar10 not found in",
    )
    assert "cifar-10-batches-py" in result.output and "data.download" in result.output


def test_info_needs_exactly_one_source():
    expect_user_error("info", match="give either a CHECKPOINT or --arch")
    expect_user_error("info", "--arch", "vgg99", match="unknown arch 'vgg99'")


def test_same_config_same_result(tmp_path, tiny_run):
    # Reproducible from the recorded config: init, batches and augmentation all follow the seeds.
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "b", *_sets())
    a = load_checkpoint(tiny_run / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "c", *_sets("train.seed=1"))
    c = load_checkpoint(tmp_path / "c" / "last.pt")["state_dict"]
    assert not torch.equal(a["features.conv0.weight"], c["features.conv0.weight"])


@pytest.mark.parametrize("arch", ["preresnet56", "densenet40"])
def test_each_paper_family_runs_the_three_stages(tmp_path, arch):
    sets = _sets(f"model.arch={arch}", "model.width=0.125", "data.subset=32")
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "s", *sets)
    result = json.loads(run("prune", tmp_path / "s" / "best.pt", "--ratio", "0.6", "-o", tmp_path / "p.pt",
                            "--json").output)
    assert result["params"] < result["params_before"]
    run("finetune", tmp_path / "p.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "f", *sets)
    info = json.loads(run("info", tmp_path / "f" / "best.pt", "--json").output)
    assert info["params"] == result["params"] and info["arch"] == arch


def test_bench_compares_checkpoints(pipeline):
    root, _, _ = pipeline
    rows = json.loads(run("bench", root / "sparse" / "best.pt", root / "pruned.pt", "--batch-sizes", "1,4",
                          "--repeats", "2", "--precision", "fp32", "--json").output)
    assert [(r["checkpoint"].endswith(n), r["batch_size"]) for r, n in
            zip(rows, ["best.pt", "best.pt", "pruned.pt", "pruned.pt"])] == [(True, 1), (True, 4), (True, 1), (True, 4)]
    # Speed-up is against the first checkpoint at the same batch size; images/s follow from the latency.
    baseline = {r["batch_size"]: r["latency_ms"] for r in rows[:2]}
    for row in rows:
        assert row["speedup"] == pytest.approx(baseline[row["batch_size"]] / row["latency_ms"])
        assert row["images_per_sec"] == pytest.approx(row["batch_size"] / row["latency_ms"] * 1e3)
    for first, pruned in ((rows[0], rows[2]), (rows[1], rows[3])):
        assert pruned["flops"] < first["flops"] and pruned["params"] < first["params"]
    assert "speed-up" in run("bench", root / "pruned.pt", "--batch-sizes", "2", "--repeats", "1").output
    expect_user_error("bench", root / "pruned.pt", "--batch-sizes", "0,x", match="comma-separated integers")


def test_a_budget_that_needs_an_overflowing_lambda_is_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *_sets("train.lr=1e-35"), code=2)
    assert "needs λ =" in result.output and "lower the budget" in result.output
    assert not out.exists()


@pytest.mark.parametrize("command, message", [
    (["eval", "{best}", "--device", "cuda:99"], "no CUDA device is available"),
    (["eval", "{best}", "--device", "meta"], "unknown device 'meta'"),
    (["sweep", "{best}", "--device", "bogus", "--ratios", "0.5"], "unknown device 'bogus'; use one of"),
    (["export", "{best}", "-o", "{tmp}/big.onnx", "--input-size", "3,100000,100000"],
     "out of memory while exporting"),
    (["bench", "{best}", "--batch-sizes", "10000000", "--repeats", "1"], "out of memory while timing"),
    (["export", "{best}", "-o", "{tmp}/o.onnx", "--opset", "7"], "writes opset 18 or later"),
    (["export", "{best}", "-o", "{tmp}/o.onnx", "--tolerance", "nan"], "'nan' is not a finite number"),
    (["sweep", "{best}", "--ratios", "0.5", "--tolerance", "inf"], "'inf' is not a finite number"),
    (["info", "--arch", "vgg11", "--width", "nan"], "width must be a positive number"),
])
def test_bad_numbers_and_devices_are_one_line_not_a_traceback(tiny_run, tmp_path, command, message):
    args = [a.format(best=tiny_run / "best.pt", tmp=tmp_path) for a in command]
    result = run(*args, code=2)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()[-1]) < 300
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_exported_artifact_is_as_readable_as_a_checkpoint(tiny_run, tmp_path):
    run("export", tiny_run / "best.pt", "-o", tmp_path / "m.ts")
    run("prune", tiny_run / "best.pt", "--ratio", "0.3", "-o", tmp_path / "p.pt", "--no-eval")
    assert (tmp_path / "m.ts").stat().st_mode & 0o777 == (tmp_path / "p.pt").stat().st_mode & 0o777


def test_inputs_of_the_wrong_kind_are_named_for_what_they_are(tiny_run, tmp_path):
    (tmp_path / "x.onnx").mkdir()
    assert "is a folder, not an exported artifact" in run("info", tmp_path / "x.onnx", code=2).output
    result = run("info", "--arch", "vgg11", "--num-classes", "10000000000", code=2)
    assert "for 10,000,000,000 classes" in result.output and "or the number of classes" in result.output
    result = run("prune", tiny_run / "best.pt", "--ratio", "0.5", "--min-channels", "1000000000",
                 "-o", tmp_path / "p.pt", code=2)
    assert "keeps every channel" in result.output and not (tmp_path / "p.pt").exists()
