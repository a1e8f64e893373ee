"""Deployable artifacts of a checkpoint: ONNX, TorchScript or torch.export (pt2), checked for parity.

The eval-mode model is exported with its BatchNorms folded into the convs before them where that is
exact (`slimctl.core.fold.fold_bn`); ChannelSelection stays a gather and the β compensation
(ConstantResponse) an added term. The artifact is written to a temp file, run in its own runtime
(onnxruntime, torch.jit.load, torch.export.load) beside the checkpoint's unfolded model on a fixed
random batch, and only renamed into place when the two agree. slimctl's record (version, arch,
widths, params, FLOPs, top-1, lineage) travels inside: ONNX metadata_props, or an extra file
`slimctl.json` in TorchScript/pt2 archives; `slimctl info ARTIFACT` reads it back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimctl._version import __version__
from slimctl.base.files import check_output
from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.core.flops import count_flops, count_params
from slimctl.core.fold import batchnorm_count, fold_bn

FORMATS = ("onnx", "torchscript", "pt2")
MIN_OPSET = 18  # the oldest opset torch's ONNX exporter writes (an older one was silently raised to it)
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
EXTRA_FILE = "slimctl.json"  # TorchScript / pt2: slimctl's record inside the archive
TOLERANCE = 1e-4  # max |exported − checkpoint| relative to max |checkpoint logits|, float32
PARITY_SEED = 0


def format_of(path: Path) -> str | None:
    """The export format a file name implies (.onnx, .ts, .pt2), or None."""
    return {suffix: fmt for fmt, suffix in SUFFIXES.items()}.get(path.suffix.lower())


def parse_input_size(text: str) -> tuple[int, int, int]:
    """`--input-size C,H,W` → (C, H, W) in pixels."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise SlimctlError(f"--input-size expects C,H,W as three positive integers (e.g. 3,32,32), got {text!r}")
    return size  # type: ignore[return-value]


def needs(fmt: str) -> None:
    """The exit-2 message naming the extra when ONNX export's packages are missing."""
    if fmt != "onnx":
        return
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise SlimctlError(f"--format onnx needs {exc.name}: pip install 'slimctl[export]' "
                           "(onnx, onnxscript, onnxruntime); or use --format torchscript / pt2") from None


def record(ckpt: dict[str, Any], model: nn.Module, checkpoint: Path, lineage: list[dict[str, Any]]) -> dict[str, str]:
    """slimctl's record as string pairs (ONNX metadata_props takes only strings)."""
    metrics = ckpt.get("metrics") or {}
    return {
        "slimctl_version": __version__,
        "arch": str(ckpt["arch"]),
        "num_classes": str(ckpt["num_classes"]),
        "input_size": json.dumps(list(ckpt["input_size"])),
        "widths": json.dumps(ckpt["widths"]),
        "params": str(count_params(model)),
        "flops": str(count_flops(model)),
        "top1": json.dumps(metrics.get("top1")),
        "stage": str(ckpt.get("stage")),
        "checkpoint": str(checkpoint),
        "lineage": json.dumps([{k: r.get(k) for k in ("stage", "path", "params", "flops", "top1")} for r in lineage]),
    }


def export_checkpoint(checkpoint: Path, out: Path, *, fmt: str, input_size: tuple[int, int, int] | None = None,
                      opset: int | None = None, fold: bool = True, dynamic_batch: bool = True, force: bool = False,
                      tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export `checkpoint` to `out` in `fmt`, after checking the artifact against the checkpoint."""
    from slimctl.io.lineage import lineage

    if fmt not in FORMATS:
        raise SlimctlError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise SlimctlError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if opset is not None and opset < MIN_OPSET:
        raise SlimctlError(f"--opset {opset}: torch's exporter writes opset {MIN_OPSET} or later")
    check_output(out, force=force)
    needs(fmt)
    ckpt = load_checkpoint(checkpoint)
    reference = model_from_checkpoint(ckpt, source=str(checkpoint)).eval()
    size = tuple(input_size or ckpt["input_size"])
    with out_of_memory_as_error(f"exporting {checkpoint} at input size {','.join(map(str, size))}", "--input-size"):
        example = torch.randn(2, *size, generator=torch.Generator().manual_seed(PARITY_SEED))
        expected = _forward(reference, example, size)  # an input size the model cannot take stops here
    model = reference
    if fold:
        model = fold_bn(reference)
    meta = record(ckpt, reference, checkpoint, lineage(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=SUFFIXES[fmt], dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        WRITERS[fmt](model, example, tmp, meta=meta, opset=opset, dynamic_batch=dynamic_batch)
        parity = [_parity(RUNNERS[fmt](tmp, example), expected, tolerance)]
        if dynamic_batch:  # another batch size than the traced one
            other = torch.randn(3, *size, generator=torch.Generator().manual_seed(PARITY_SEED + 1))
            parity.append(_parity(RUNNERS[fmt](tmp, other), _forward(reference, other, size), tolerance))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would make the artifact private, unlike checkpoints
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "out": str(out), "format": fmt, "input_size": list(size), "folded_bn": fold,
        "batch": "dynamic" if dynamic_batch else "static",
        "max_abs_diff": max(p["max_abs_diff"] for p in parity), "max_rel_diff": max(p["max_rel_diff"] for p in parity),
        "tolerance": tolerance, "bn_left": batchnorm_count(model),
        "metadata": meta,
    }


def _forward(model: nn.Module, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """The checkpoint's logits; an input size the model cannot take is exit 2, named."""
    try:
        with torch.inference_mode():
            return model(x)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SlimctlError(f"input size {','.join(map(str, size))} does not fit this model ({first}); "
                           "give --input-size C,H,W that it takes (the checkpoint records the one it was trained at)") from None


def _parity(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> dict[str, float]:
    """Max abs and relative difference of the 'logits' output; above `tolerance` is an error."""
    if got.shape != want.shape:
        raise SlimctlError(f"exported output 'logits' has shape {tuple(got.shape)}, the checkpoint's {tuple(want.shape)}")
    abs_diff = float((got.float() - want.float()).abs().max())
    rel_diff = abs_diff / max(float(want.abs().max()), 1e-12)
    if not rel_diff <= tolerance:  # NaN fails too
        raise SlimctlError(f"exported output 'logits' differs from the checkpoint's: max abs {abs_diff:.3g}, "
                           f"relative {rel_diff:.3g} > {tolerance:g}; nothing was written")
    return {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff}


# --------------------------------------------------------------------------- writers and runners


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, meta: dict[str, str], opset: int | None,
                dynamic_batch: bool) -> None:
    import onnx

    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    kwargs = {"opset_version": opset} if opset is not None else {}
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=dynamic, verbose=False, **kwargs)
    program.save(str(path))
    proto = onnx.load(str(path))
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, *, meta: dict[str, str],
                       opset: int | None, dynamic_batch: bool) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated upstream (pt2 is its successor) and warns at every call; the
        # tracer's note on `kernel.numel()` is about a buffer's fixed size, which a trace may keep.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))(x)


def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, *, meta: dict[str, str], opset: int | None,
               dynamic_batch: bool) -> None:
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(meta)})


def _run_pt2(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(x)


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2}
RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript, "pt2": _run_pt2}


def read_artifact(path: Path) -> dict[str, Any]:
    """slimctl's record stored in an exported artifact (for `slimctl info`)."""
    fmt = format_of(path)
    if not path.is_file():
        raise SlimctlError(f"{path} is a folder, not an exported artifact" if path.is_dir() else
                           f"{path} does not exist" if not path.exists() else f"{path} is not a regular file")
    try:
        if fmt == "onnx":
            needs("onnx")
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        elif fmt in ("torchscript", "pt2"):
            meta = _archive_record(path)
        else:
            raise SlimctlError(f"{path}: not an exported artifact (.onnx, .ts, .pt2)")
    except SlimctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf, zip and pickle readers each raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise SlimctlError(f"{path}: cannot read it as {fmt} ({first})") from None
    if "slimctl_version" not in meta:
        raise SlimctlError(f"{path}: a {fmt} file without slimctl's record (not exported by `slimctl export`)")
    decoded = {k: _decode(v) for k, v in meta.items()}
    problem = _record_problem(decoded)
    if problem:
        raise SlimctlError(f"{path}: its slimctl record is incomplete or altered ({problem})")
    return {"format": fmt, **decoded}


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in an artifact's record (what `record` writes), or None."""
    counts = all(isinstance(record.get(k), int) and not isinstance(record.get(k), bool) for k in ("params", "flops"))
    if not counts:
        return "params and flops must be integers"
    if not isinstance(record.get("arch"), str) or not isinstance(record.get("stage"), str):
        return "arch and stage must be names"
    top1 = record.get("top1")
    if top1 is not None and not isinstance(top1, (int, float)):
        return "top1 must be a number"
    lineage = record.get("lineage", [])
    if not (isinstance(lineage, list) and all(isinstance(r, dict) and isinstance(r.get("stage"), str) for r in lineage)):
        return "lineage must be a list of stages"
    return None


RECORD_LIMIT = 1 << 20  # bytes: slimctl's record is a few hundred; anything larger is not one


def _archive_record(path: Path) -> dict[str, Any]:
    """slimctl's record in a TorchScript or pt2 archive (a zip with `<root>/extra/slimctl.json`),
    read straight from the zip: nothing in the archive is loaded or unpickled, so a crafted file
    cannot run code through `slimctl info`."""
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if i.filename.count("/") == 2
                   and i.filename.split("/", 1)[1] == f"extra/{EXTRA_FILE}"]
        if not entries:
            return {}
        if entries[0].file_size > RECORD_LIMIT:
            raise SlimctlError(f"{path}: its {EXTRA_FILE} is {entries[0].file_size:,} bytes, not a slimctl record")
        meta = json.loads(archive.read(entries[0]).decode())
    if not isinstance(meta, dict):
        raise SlimctlError(f"{path}: its {EXTRA_FILE} is not a slimctl record")
    return meta


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value
