"""Self-describing checkpoints, written atomically and read without unpickling code.

A checkpoint is one `torch.save` dict of plain types and tensors that rebuilds its model alone:

    format      "slimctl/2" ("slimctl/1", whose digest covered the model fields only, is still read)
    digest      sha256 of every other field, tensors included, checked on load (bit rot,
                truncation, an edited record); every field is then checked for type and range
    arch, num_classes, arch_args    what `create_model` needs (arch_args: {"width": …})
    input_size  [C, H, W] the model's FLOPs are counted at (and a traced model is traced with)
    widths      module name → resizable shape (see models.layers.module_widths)
    state_dict  of the unwrapped model (no `module.` / `_orig_mod.` prefixes)
    config      the resolved run config (dict)
    stage       "sparse-train" | "prune" | "finetune"
    parent      {path, sha256} of the input checkpoint, or None
    metrics     {params, flops, top1, …}
    prune       {ratio, threshold, min_channels, layers: [{name, kept, total}]} or None
    resume      {epoch, optimizer, best_top1, rng, …} while a run can be resumed, else None
    versions    {slimctl, torch}

Writes are atomic (`slimctl.base.files`): a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimctl._version import __version__
from slimctl.errors import SlimctlError
from slimctl.base.files import atomic_write_bytes, file_sha256
from slimctl.models import create_model, module_widths
from slimctl.models.layers import unwrap
from slimctl.base.registry import default_input_size, is_import_path, is_known_arch, list_models, plain_data, resolve_import

FORMAT = "slimctl/2"
LEGACY_FORMAT = "slimctl/1"  # digest over the model fields only
STAGES = ("sparse-train", "prune", "finetune", "scratch")
REQUIRED_KEYS = ("format", "arch", "num_classes", "arch_args", "widths", "state_dict", "stage", "digest")


# --------------------------------------------------------------------------- save


def model_digest(arch: Any, num_classes: Any, arch_args: Any, widths: Any, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over what defines the model: a flipped bit in a weight must not load silently
    (torch's zip reader does not check CRCs of tensor records)."""
    digest = hashlib.sha256(json.dumps([arch, num_classes, arch_args, widths], sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key]
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Hash `value` (nested dicts, lists, tensors, plain values) in a canonical order."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value, default=repr).encode() + b";")


def record_digest(checkpoint: dict[str, Any]) -> str:
    """sha256 over every field but the digest itself: an edited record (input_size, metrics, parent,
    config, …) is as corrupt as a flipped weight."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in checkpoint.items() if k != "digest"})
    return digest.hexdigest()


def make_checkpoint(
    model: nn.Module,
    *,
    stage: str,
    config: dict[str, Any] | None = None,
    parent: str | Path | None = None,
    parent_sha256: str | None = None,
    metrics: dict[str, Any] | None = None,
    prune: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`parent_sha256`: the parent file's hash when the caller has it (training saves every epoch)."""
    model = unwrap(model)
    spec = model.arch_spec  # set by create_model
    widths = module_widths(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    checkpoint = {
        "format": FORMAT,
        "arch": spec["arch"],
        "num_classes": spec["num_classes"],
        "arch_args": dict(spec["arch_args"]),
        "input_size": list(spec["input_size"]),
        "widths": widths,
        "state_dict": state,
        "config": config,
        "stage": stage,
        "parent": None if parent is None else {"path": str(Path(parent).resolve()),
                                               "sha256": parent_sha256 or file_sha256(parent)},
        "metrics": metrics or {},
        "prune": prune,
        "resume": resume,
        "versions": {"slimctl": __version__, "torch": str(torch.__version__)},
    }
    return checkpoint  # its digest is computed by save_checkpoint, over what is written


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically, digested as written (a field changed after make_checkpoint is covered too)."""
    checkpoint = {**checkpoint, "format": FORMAT}
    checkpoint["digest"] = record_digest(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- load


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; every way it can be wrong is a SlimctlError."""
    path = Path(path)
    if not path.exists():
        raise SlimctlError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise SlimctlError(f"{path} is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    if not path.is_file():
        raise SlimctlError(f"{path} is not a regular file (a pipe or a device); pass a checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if match:  # a pickled class or function: slimctl never writes one, and it could run code
            raise SlimctlError(
                f"{path} is not a slimctl checkpoint: it contains a pickled object ({match.group(1)}), "
                "which is refused because loading it could run code"
            ) from None
        if "Weights only load failed" in str(exc) and _starts_like_a_pickle(path):
            raise SlimctlError(f"{path} is not a slimctl checkpoint: it holds pickled data other than tensors and "
                               "plain values, refused because loading it could run code") from None
        raise SlimctlError(f"{path} is not a readable slimctl checkpoint (corrupt or not a torch file)") from None
    except Exception as exc:  # truncated zip, random bytes, text, permission denied, …
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else "corrupt, truncated or not a torch file"
        raise SlimctlError(f"{path} is not a readable slimctl checkpoint ({what})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise SlimctlError(f"{path} is not a slimctl checkpoint (no 'format' key); was it written by slimctl?")
    if ckpt["format"] not in (FORMAT, LEGACY_FORMAT):
        raise SlimctlError(
            f"{path} has checkpoint format {str(ckpt['format'])[:40]!r}; this slimctl reads {FORMAT!r} (upgrade slimctl?)"
        )
    required = REQUIRED_KEYS + (("input_size", "config", "parent", "metrics") if ckpt["format"] == FORMAT else ())
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise SlimctlError(f"{path} is missing checkpoint keys: {', '.join(missing)}")
    if not isinstance(ckpt["state_dict"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        raise SlimctlError(f"{path}: 'state_dict' must map names to tensors")
    try:
        digest = (record_digest(ckpt) if ckpt["format"] == FORMAT else
                  model_digest(ckpt["arch"], ckpt["num_classes"], ckpt["arch_args"], ckpt["widths"], ckpt["state_dict"]))
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise SlimctlError(f"{path}: malformed checkpoint ({type(exc).__name__})") from None
    if ckpt.get("digest") != digest:
        raise SlimctlError(f"{path} is corrupted: its contents do not match the digest recorded when it was saved")
    check_fields(ckpt, path)
    if "input_size" not in ckpt:  # slimctl/1 files from before the field: the arch's default
        ckpt["input_size"] = list(default_input_size(ckpt["arch"]))
    return ckpt


def _is_count(value: Any, low: int = 1, high: int = 2**31) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _field_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's fields (types and ranges), or None."""
    arch = ckpt["arch"]
    if not isinstance(arch, str) or not 0 < len(arch) <= 200:
        return "'arch' must be a name"
    classes = ckpt["num_classes"]
    if not (_is_count(classes, high=10**7) or (classes is None and ":" in arch)):
        return "'num_classes' must be a positive integer"
    if not isinstance(ckpt["arch_args"], dict) or not all(isinstance(k, str) for k in ckpt["arch_args"]):
        return "'arch_args' must map names to values"
    size = ckpt.get("input_size", [3, 32, 32])
    if not (isinstance(size, list) and len(size) == 3 and all(_is_count(v, high=65536) for v in size)):
        return "'input_size' must be [C, H, W] of positive integers"
    widths = ckpt["widths"]
    if not isinstance(widths, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(_is_count(n, 0) for n in v) for k, v in widths.items()):
        return "'widths' must map module names to lists of channel counts"
    if ckpt["stage"] not in STAGES:
        return f"'stage' must be one of {', '.join(STAGES)}"
    parent = ckpt.get("parent")
    if parent is not None and not (isinstance(parent, dict) and isinstance(parent.get("path"), str)
                                   and re.fullmatch(r"[0-9a-f]{64}", str(parent.get("sha256")))):
        return "'parent' must be null or {path, sha256}"
    for key in ("config", "metrics", "prune", "resume", "versions"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"'{key}' must be a mapping or null"
    metrics = ckpt.get("metrics") or {}
    for key in ("params", "flops"):
        if key in metrics and not _is_count(metrics[key], 0, 2**62):
            return f"'metrics.{key}' must be a count"
    for key in ("top1", "best_top1"):
        value = metrics.get(key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 100):
            return f"'metrics.{key}' must be a percentage"
    return None


def check_fields(ckpt: dict[str, Any], path: str | Path) -> None:
    """Every field's type and range (a file from slimctl/1, or one whose digest matches but was
    written by other code): a mismatch is a corrupt checkpoint, in one line."""
    problem = _field_problem(ckpt)
    if problem:
        raise SlimctlError(f"{path} is corrupted: {problem}")
    if ckpt.get("config") is not None:
        from slimctl.io.config import config_from_dict

        try:
            config_from_dict(ckpt["config"])
        except SlimctlError as exc:
            raise SlimctlError(f"{path} is corrupted: its recorded config is invalid ({exc})") from None


def _starts_like_a_pickle(path: Path) -> bool:
    """A bare pickle of protocol 2 or later opens with the PROTO opcode (0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu", source: str = "checkpoint") -> nn.Module:
    """Rebuild the model from the checkpoint alone: arch + widths, then the state_dict (strict)."""
    arch = ckpt["arch"]
    try:
        known = isinstance(arch, str) and is_known_arch(arch)
    except SlimctlError as exc:  # an import path that does not resolve: say why
        raise SlimctlError(f"{source}: {exc}") from None
    if not known:
        raise SlimctlError(f"{source}: unknown arch {str(arch)[:100]!r}; known: {', '.join(list_models())}, "
                           "torchvision.<name>, timm.<name>, module:ClassName")
    widths, state = ckpt["widths"], ckpt["state_dict"]
    if not isinstance(widths, dict) or not isinstance(state, dict):
        raise SlimctlError(f"{source}: 'widths' and 'state_dict' must be mappings")
    args = ckpt["arch_args"] if isinstance(ckpt["arch_args"], dict) else {}
    try:
        input_size = ckpt.get("input_size")
        classes = None if ckpt["num_classes"] is None else int(ckpt["num_classes"])  # None: a user's model
        model = create_model(arch, classes, widths=widths, input_size=input_size, **args)
    except SlimctlError as exc:
        raise SlimctlError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise SlimctlError(f"{source}: cannot build {arch!r} from its recorded arguments ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise SlimctlError(f"{source}: weights do not match the recorded widths ({detail})") from None
    return model.to(device)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The eval-mode model stored in a slimctl checkpoint (no code is unpickled)."""
    model = model_from_checkpoint(load_checkpoint(path), device=device, source=str(path))
    return model.eval()


def importable_spec(model: nn.Module, args: dict[str, Any] | None) -> dict[str, Any]:
    """What rebuilds a model of the user's own class: its import path (`module:Class`) and the
    plain-data keyword arguments of its constructor, checked to import back and to bind."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        where = "in the script being run (__main__)" if cls.__module__ == "__main__" else "inside a function"
        raise SlimctlError(f"{cls.__name__} is defined {where}, which loading cannot import without running that "
                           "code again: move the class into a module of its own (e.g. models.py) and import it")
    arch = f"{cls.__module__}:{cls.__qualname__}"
    if resolve_import(arch) is not cls:
        raise SlimctlError(f"{arch} does not import back as the class of this model")
    args = plain_data(args or {}, f"the arguments of {arch}")
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        raise SlimctlError(f"{arch}({', '.join(args)}): {exc}; pass the constructor's keyword arguments as "
                           "args={...} (plain data) so the file can rebuild the model") from None
    spec = getattr(model, "arch_spec", None) or {}
    return {"arch": arch, "num_classes": spec.get("num_classes"), "arch_args": {"width": 1.0, "args": args},
            "input_size": list(spec.get("input_size") or default_input_size(arch))}


def save_model(model: nn.Module, path: str | Path, *, args: dict[str, Any] | None = None, stage: str = "prune",
               **record: Any) -> None:
    """Write `model`, pruned or not, as a self-describing checkpoint that `load_model` rebuilds
    without unpickling code. A model `create_model` built records how; any other module is recorded
    as its class's import path plus `args` (its constructor's keyword arguments, plain data), and
    loading needs that class importable, as loading a torchvision model needs torchvision. The file
    is rebuilt from the checkpoint before it is written, so what is saved loads back. `record`: the
    other `make_checkpoint` fields (config, parent, metrics, prune)."""
    net = unwrap(model)
    spec = getattr(net, "arch_spec", None)
    if spec is None or spec.get("arch") is None or (args is not None and is_import_path(spec["arch"])):
        net.arch_spec = importable_spec(net, args)
    elif args is not None:
        raise SlimctlError(f"args: {spec['arch']} was built by create_model, which recorded its arguments")
    checkpoint = make_checkpoint(net, stage=stage, **record)
    try:
        model_from_checkpoint(checkpoint, source="the checkpoint")
    except SlimctlError as exc:
        raise SlimctlError(f"{path} not written: {exc}") from None
    save_checkpoint(path, checkpoint)
