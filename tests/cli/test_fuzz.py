"""Property tests: no input, however mangled, gets anything but a valid result or exit code 2."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run
from slimctl import make_checkpoint, save_checkpoint
from slimctl.io.config import Config, config_from_dict, load_config
from slimctl.errors import SlimctlError
from slimctl.models import create_model

KEYS = ["model", "data", "train", "finetune", "prune", "arch", "width", "name", "root", "epochs", "lr",
        "milestones", "sparsity", "batch_size", "subset", "ratio", "min_channels", "device", "precision", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["vgg11", "digits", "cpu", "auto", "1e-4"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_yaml_document_is_a_config_or_a_clear_error(doc):
    try:
        assert isinstance(config_from_dict(doc), Config)
    except SlimctlError as exc:
        assert str(exc) and "\n" not in str(exc)


dotted = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)
set_strings = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", dotted, st.text(string.printable, max_size=12)),
    st.text(string.printable, max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(set_strings, max_size=3))
def test_any_set_string_is_a_config_or_a_clear_error(items):
    try:
        assert isinstance(load_config(None, items), Config)
    except SlimctlError as exc:
        assert str(exc)


CHECKPOINT_PARAMS = sum(p.numel() for p in create_model("vgg11", 10, width=0.0625).parameters())


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "c.pt"
    model = create_model("vgg11", 10, width=0.0625)
    config = load_config(None, ["data.name=digits", "train.device=cpu"]).to_dict()
    save_checkpoint(path, make_checkpoint(model, stage="sparse-train", config=config, metrics={"top1": 50.0}))
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_checkpoints_never_crash_the_cli(checkpoint_bytes, tmp_path_factory, data):
    blob = bytearray(checkpoint_bytes)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(blob) - 1), label="byte")
            blob[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "c.pt"
    path.write_bytes(bytes(blob))
    command = data.draw(st.sampled_from([
        ["info", str(path), "--json"],
        ["eval", str(path), "--json"],
        ["prune", str(path), "--ratio", "0.5", "-o", str(folder / "out.pt"), "--json"],
    ]), label="command")
    result = run(*command, code=None)
    assert result.exit_code in (0, 2), (command, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 0 and command[0] == "info":  # whatever loads is the intact model
        assert json.loads(result.output)["params"] == CHECKPOINT_PARAMS


FIELDS = ["arch", "num_classes", "arch_args", "input_size", "widths", "state_dict", "stage", "parent", "config",
          "metrics", "prune", "resume", "versions"]
MUTATIONS = {
    "wrong type": lambda value: "text" if not isinstance(value, str) else 7,
    "nan": lambda value: float("nan"),
    "negative": lambda value: -1,
    "huge": lambda value: 10**30,
    "nested": lambda value: {"a": [float("nan"), -1, "x"]} if not isinstance(value, dict) else {**value, "x": [-1]},
    "missing": None,
}


@pytest.mark.parametrize("field", FIELDS)
def test_every_checkpoint_field_is_validated_by_every_reader(checkpoint_bytes, tmp_path, field):
    """Each field mutated in a file whose digest still matches (as a careless writer would leave it):
    every command that reads checkpoints gives a result or exit 2 in one line, never a traceback."""
    import io

    import torch

    from slimctl.io.checkpoint import record_digest

    original = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    for name, mutate in MUTATIONS.items():
        ckpt = dict(original)
        if mutate is None:
            ckpt.pop(field)
        else:
            ckpt[field] = mutate(original[field])
        ckpt["digest"] = record_digest(ckpt)
        path = tmp_path / f"{name}.pt"
        torch.save(ckpt, path)
        for command in (["info", path, "--json"], ["eval", path, "--json"], ["report", path, "--json"],
                        ["prune", path, "--ratio", "0.5", "-o", tmp_path / "o.pt", "--force", "--no-eval"],
                        ["export", path, "-o", tmp_path / "o.ts", "--force"],
                        ["bench", path, "--batch-sizes", "1", "--repeats", "1", "--json"]):
            result = run(*command, code=None)
            assert result.exit_code in (0, 2), (field, name, command[0], result.output, result.exception)
            assert result.exception is None or isinstance(result.exception, SystemExit), (field, name, command[0])
            lines = result.output.strip().splitlines()
            if result.exit_code == 2:
                assert len(lines[-1]) < 400 and lines[-1].startswith("Error:"), (field, name, command[0], lines)


RUN_MUTATIONS = [None, "text", float("nan"), -1, 10**30, {"a": [1]}]


@pytest.mark.parametrize("key", ["epoch", "test_top1", "images_per_sec", "gamma_mean_abs", "gamma_frac_below_1e-2"])
def test_every_run_folder_field_is_validated_by_compare_and_report(tmp_path, key):
    """metrics.jsonl rows and config.yaml values mutated one at a time: compare and report give a
    result or exit 2 in one line, never a traceback."""
    import yaml

    row = {"epoch": 1, "test_top1": 50.0, "images_per_sec": 100.0, "gamma_mean_abs": 0.5,
           "gamma_frac_below_1e-2": 0.1}
    configs = [{"stage": "sparse-train"}, {"stage": 7, "environment": "x"}, [1, 2], "text", None]
    for i, (value, config) in enumerate(zip(RUN_MUTATIONS, configs * 2)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        mutated = {k: v for k, v in row.items() if k != key} if value is None else {**row, key: value}
        (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(mutated) + "\n")
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        for command in (["compare", folder], ["compare", folder, "--json"], ["report", folder]):
            result = run(*command, code=None)
            assert result.exit_code in (0, 2), (key, value, command[0], result.output, result.exception)
            assert result.exception is None or isinstance(result.exception, SystemExit), (key, value, command[0])
