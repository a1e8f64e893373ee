import re

import pytest
import torch

from conftest import randomize_bn
from slimctl import load_model, make_checkpoint, prune_model, save_checkpoint
from slimctl.io.checkpoint import atomic_write_bytes, load_checkpoint, model_digest, model_from_checkpoint, record_digest
from slimctl.errors import SlimctlError
from slimctl.models import create_model


def _pruned_checkpoint(tmp_path):
    model = randomize_bn(create_model("vgg11", 10, width=0.25)).eval()
    pruned, _, *_ = prune_model(model, 0.5)
    path = tmp_path / "p.pt"
    save_checkpoint(path, make_checkpoint(pruned, stage="prune", metrics={"top1": 50.0}))
    return path, pruned


def test_round_trip_rebuilds_the_pruned_model_from_the_file_alone(tmp_path):
    path, pruned = _pruned_checkpoint(tmp_path)
    loaded = load_model(path)
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "slimctl/2" and ckpt["arch"] == "vgg11" and ckpt["arch_args"] == {"width": 0.25}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])


PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


def _leaves(value):
    if isinstance(value, dict):
        yield from value.keys()
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_checkpoint_holds_only_plain_types(tmp_path):
    path, pruned = _pruned_checkpoint(tmp_path)
    # weights_only=True refuses any pickled class; the file loads that way, and holds only plain data.
    ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt, dict) and ckpt["format"] == "slimctl/2"
    assert [type(v).__name__ for v in _leaves(ckpt) if not isinstance(v, PLAIN)] == []
    state = ckpt["state_dict"]
    assert set(state) == set(pruned.state_dict())
    assert all(torch.equal(state[k], v) for k, v in pruned.state_dict().items())


def test_compiled_or_ddp_prefixes_are_never_saved(tmp_path):
    model = create_model("vgg11", 10, width=0.125)

    class Wrapper(torch.nn.Module):  # what torch.compile returns exposes `_orig_mod`
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    ckpt = make_checkpoint(Wrapper(model), stage="sparse-train")
    assert set(ckpt["state_dict"]) == set(model.state_dict())


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    target.write_bytes(b"previous")

    def exploding_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", exploding_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable slimctl checkpoint"),
        (b"hello world, not a checkpoint", "not a readable slimctl checkpoint"),
    ],
)
def test_garbage_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(SlimctlError, match=message):
        load_checkpoint(path)


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "slimctl/1", "payload": Evil()}, path)
    with pytest.raises(SlimctlError, match="not a slimctl checkpoint"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_truncated_checkpoint_is_refused(tmp_path):
    path, _ = _pruned_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimctlError):
        load_checkpoint(path)


def _mutated(tmp_path, **changes):
    path, _ = _pruned_checkpoint(tmp_path)
    ckpt = load_checkpoint(path)
    ckpt.update(changes)
    for key, value in list(changes.items()):
        if value is None:
            del ckpt[key]
    if "widths" in ckpt:  # a consistent file, as a newer slimctl might write one
        ckpt["digest"] = record_digest(ckpt)
    out = tmp_path / "m.pt"
    torch.save(ckpt, out)
    return out


def test_wrong_format_missing_keys_unknown_arch_and_bad_widths(tmp_path):
    with pytest.raises(SlimctlError, match="format 'slimctl/99'"):
        load_checkpoint(_mutated(tmp_path, format="slimctl/99"))
    with pytest.raises(SlimctlError, match="missing checkpoint keys: widths"):
        load_checkpoint(_mutated(tmp_path, widths=None))
    with pytest.raises(SlimctlError, match="unknown arch 'resnet9000'"):
        load_model(_mutated(tmp_path, arch="resnet9000"))
    path, _ = _pruned_checkpoint(tmp_path)
    ckpt = load_checkpoint(path)
    ckpt["widths"]["features.conv0"] = [3, 7, 1]  # disagrees with the stored weights
    with pytest.raises(SlimctlError, match="do not match the recorded widths"):
        model_from_checkpoint(ckpt)
    ckpt["widths"]["features.nonexistent"] = [1]
    with pytest.raises(SlimctlError, match="does not have"):
        model_from_checkpoint(ckpt)


def test_a_plain_state_dict_is_not_mistaken_for_a_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(create_model("vgg11", 10, width=0.125).state_dict(), path)
    with pytest.raises(SlimctlError, match="no 'format' key"):
        load_checkpoint(path)
    with pytest.raises(SlimctlError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_changed_weight_is_detected(tmp_path):
    path, _ = _pruned_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["features.conv0.weight"][0, 0, 0, 0] += 1e-3  # one weight, as bit rot would
    torch.save(ckpt, path)
    with pytest.raises(SlimctlError, match="is corrupted"):
        load_checkpoint(path)


def test_an_edited_record_is_as_corrupt_as_an_edited_weight(tmp_path):
    path, _ = _pruned_checkpoint(tmp_path)
    for field, value in (("input_size", [3, 48, 48]), ("num_classes", 11), ("metrics", {"top1": 99.0}),
                         ("stage", "finetune"), ("config", {"model": {"arch": "vgg13"}})):
        ckpt = torch.load(path, weights_only=True)
        ckpt[field] = value  # the digest left as it was
        torch.save(ckpt, tmp_path / "edited.pt")
        with pytest.raises(SlimctlError, match="is corrupted"):
            load_checkpoint(tmp_path / "edited.pt")


def test_a_legacy_checkpoint_loads_and_its_fields_are_still_checked(tmp_path):
    path, pruned = _pruned_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    legacy = {k: v for k, v in ckpt.items() if k != "input_size"}
    legacy.update(format="slimctl/1", digest=model_digest(ckpt["arch"], ckpt["num_classes"], ckpt["arch_args"],
                                                          ckpt["widths"], ckpt["state_dict"]))
    torch.save(legacy, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["input_size"] == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "old.pt")(x), pruned.eval()(x))
    torch.save({**legacy, "input_size": [3, -1, 32]}, tmp_path / "bad.pt")  # the model digest does not see it
    with pytest.raises(SlimctlError, match="is corrupted: 'input_size'"):
        load_checkpoint(tmp_path / "bad.pt")


def test_what_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Payload(), protocol=4))  # a bare pickle, not a torch file
    torch.save({"format": "slimctl/2", "x": Payload()}, tmp_path / "torch.pt")
    (tmp_path / "text.pt").write_text("hello")
    os.mkfifo(tmp_path / "fifo.pt")
    for name, message in (("raw.pt", "refused because loading it could run code"),
                          ("torch.pt", "a pickled object (posix.system)"),
                          ("text.pt", "corrupt, truncated or not a torch file"),
                          ("fifo.pt", "not a regular file")):
        with pytest.raises(SlimctlError, match=re.escape(message)):
            load_checkpoint(tmp_path / name)
