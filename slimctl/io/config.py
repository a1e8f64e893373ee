"""Run configuration: YAML file + dotted `--set key=value` overrides → frozen dataclasses.

Every key has a type and a range; anything else is a `SlimctlError` that names the key, so the
CLI shows one line and exits with code 2. The resolved config (all defaults filled in) is what a
run writes to its folder and stores in its checkpoints: a run can be repeated from it alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimctl.errors import SlimctlError
from slimctl.base.files import atomic_write_text
from slimctl.base.registry import plain_data
from slimctl.io.yaml_safe import MAX_CONFIG_BYTES, safe_yaml
from slimctl.io.validation import _shown, validate


@dataclass(frozen=True)
class ModelConfig:
    # A slimctl family (vgg19, resnet164, densenet40, …), torchvision.<name> (e.g. torchvision.resnet50),
    # timm.<name> (e.g. timm.efficientnet_b0; needs the [timm] extra), or your own model by import path,
    # package.module:ClassName (an nn.Module subclass, or a function decorated with
    # @slimctl.register_builder), imported from the working directory or PYTHONPATH.
    arch: str = "vgg19"
    # Keyword arguments of the model's constructor (plain data); num_classes is passed when it takes one.
    args: dict[str, Any] = field(default_factory=dict)
    # Multiplies every channel width of the family (at least 1 channel per layer).
    width: float = 1.0
    # Pretrained start: a torchvision weights name (e.g. ResNet50_Weights.IMAGENET1K_V2, downloaded
    # by torchvision), `timm` (a timm arch's default pretrained weights, downloaded by timm) or a local
    # state_dict file; layers whose shape differs (the head) stay fresh.
    weights: str | None = None


@dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    test_batch_size: int = 256
    # Keep at most this many training samples (chosen by `seed`); for smoke runs.
    subset: int | None = None
    # Hold out this many training images (chosen by `seed`) and evaluate on them instead of the test
    # set: a validation split for tuning a recipe without looking at test accuracy. The checkpoints
    # record it, so eval/sweep/prune of them measure the held-out images too (tensor data sets only).
    holdout: int | None = None
    # Seeds the shuffling/augmentation stream and the choice of `subset` and `holdout`.
    seed: int = 0
    # imagefolder only: training crop size in pixels (default 224) and loader worker processes.
    image_size: int | None = None
    workers: int = 4


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 160
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Fractions of `epochs` at which the lr is multiplied by `lr_decay`; applied as integer epochs.
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    # λ of the L1 penalty on BN scales (the paper's sparsity term); 0 trains normally.
    sparsity: float = 0.0
    # Or state the strength as the run's L1 budget instead of λ: how far (in units of |γ|) the L1
    # term alone can move a γ over the whole schedule, λ·Σ_t lr_t. λ is then derived from the
    # schedule (epochs, lr, milestones, steps per epoch) and recorded. Set one of the two, not both.
    sparsity_budget: float | None = None
    # Which BN scales get it: the ones pruning ranks, or every BatchNorm2d (the same set for
    # slimctl's own families; differs for traced models with frozen spaces).
    sparsity_on: str = "ranked"
    # The sparsity term: l1, the paper's λ·Σ|γ|; or polarization (Zhuang et al., NeurIPS 2020),
    # λ·(t·Σ|γ| − Σ|γ − mean γ|) over the same scales, which pushes the smallest γ to 0 and the others
    # away from it, with γ kept in [0, gamma_bound] after every step. λ / sparsity_budget set its
    # strength either way (the budget is λ·Σ lr, as for L1).
    regularizer: str = "l1"
    # polarization only: t, the weight of its L1 part (the reference code's default 1.0; a larger t
    # sends more channels to zero) and the upper bound of γ (the reference code clamps to [0, 1]).
    polarization_t: float = 1.0
    gamma_bound: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    # NHWC memory layout for the model and batches: faster for VGG-like nets on CPU (measured
    # ~1.2×), slower for the 1×1-conv bottlenecks of ResNet-164 on CPU.
    channels_last: bool = False
    # torch.compile the training step: true (torch's default mode), false, or a mode name
    # (reduce-overhead: CUDA graphs, the fast choice on a GPU at small batches). Compiling takes
    # a minute or more first, so it pays off over long runs; a failure falls back to eager.
    compile: bool | str = False
    # Under torchrun: BatchNorm statistics over the global batch instead of each process's share.
    sync_bn: bool = False


@dataclass(frozen=True)
class DistillConfig:
    # Knowledge distillation while fine-tuning: loss = (1 − alpha)·CE + alpha·T²·KL(teacher ‖ student)
    # at temperature T. alpha 0 (the default) is plain fine-tuning.
    alpha: float = 0.0
    temperature: float = 4.0
    # A checkpoint to learn from; null = the pruned checkpoint's parent (usually the sparse model).
    teacher: str | None = None


@dataclass(frozen=True)
class FinetuneConfig:
    """Same keys as `train`; a key left unset (null) inherits the `train` value."""

    epochs: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    milestones: tuple[float, ...] | None = None
    lr_decay: float | None = None
    sparsity: float | None = None
    sparsity_budget: float | None = None
    sparsity_on: str | None = None
    seed: int | None = None
    device: str | None = None
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | str | None = None
    sync_bn: bool | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.7
    # No layer keeps fewer channels than this (its largest |γ| are kept).
    min_channels: int = 1


@dataclass(frozen=True)
class LogConfig:
    # TensorBoard events in RUN_DIR/tb: losses, top-1, lr, images/s, λ, |γ| statistics and per-epoch
    # |γ| histograms (needs pip install 'slimctl[tb]').
    tensorboard: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def finetune_train(self) -> TrainConfig:
        """The `train` settings with the `finetune` overrides applied; sparsity is always 0."""
        overrides = {k: v for k, v in dataclasses.asdict(self.finetune).items() if v is not None and k != "distill"}
        overrides["sparsity"] = 0.0
        overrides["sparsity_budget"] = None
        # No term, so no polarization and no clamping of γ either.
        overrides.update(regularizer="l1", polarization_t=1.0, gamma_bound=1.0)
        return dataclasses.replace(self.train, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types only (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- parsing


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise SlimctlError(f"config: expected a mapping of sections, got {_type_name(raw)}")
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise SlimctlError(f"config file {path}: {path.stat().st_size:,} bytes; a config is at most "
                               f"{MAX_CONFIG_BYTES:,}")
        if path.exists() and not path.is_file():
            raise SlimctlError(f"config file {path} is not a regular file")
        text = path.read_text()
    except FileNotFoundError:
        raise SlimctlError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SlimctlError(f"cannot read config file {path}: {exc}") from None
    try:
        data = safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SlimctlError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SlimctlError(f"config file {path}: expected a mapping of sections, got {_type_name(data)}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SlimctlError(f"--set expects key=value (e.g. --set train.epochs=10), got {_shown(item)}")
    try:
        value = safe_yaml(text, f"--set {key}") if text.strip() else None
    except yaml.YAMLError:
        raise SlimctlError(f"--set {key}: cannot parse value {_shown(text)} as YAML") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SlimctlError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise SlimctlError(f"unknown config key '{dotted}'{_suggest(str(key), names, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise SlimctlError(f"config key '{dotted}' must be a section (mapping), got {_type_name(value)}")
            kwargs[key] = _build(hint, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {', '.join(names)}"


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        if any(isinstance(value, a) for a in inner):  # plain types only (e.g. bool | str)
            return value
        raise SlimctlError(f"config key '{key}' must be {' or '.join(a.__name__ for a in inner)}, "
                           f"got {_type_name(value)} {_shown(value)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise SlimctlError(f"config key '{key}' must be a mapping, got {_type_name(value)}")
        return plain_data(value, f"config key '{key}'")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SlimctlError(f"config key '{key}' must be a list, got {_type_name(value)}")
        (item_type, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SlimctlError(f"config key '{key}' must be a finite number, got {_shown(value)}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise SlimctlError(f"config key '{key}' must be {hint.__name__}, got {_type_name(value)} {_shown(value)}")


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def save_config(cfg: Config, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config as YAML (atomically); `extra` adds a provenance section."""
    data = cfg.to_dict()
    if extra:
        data = {**data, **extra}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
