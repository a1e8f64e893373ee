"""Types and ranges of a run configuration: every value checked, each error naming its key.

`slimctl.io.config` parses; this module checks what it parsed (`validate`), so a bad value is one
SlimctlError line (exit 2) before anything runs. Upper bounds sit far beyond any real recipe and
below what float32 arithmetic overflows on.
"""

from __future__ import annotations

from typing import Any

from slimctl.base.device import COMPILE_MODES, DEVICES, PRECISIONS
from slimctl.core.plan import validate_ratio
from slimctl.core.sparsity import REGULARIZERS
from slimctl.errors import SlimctlError

# The functions below take slimctl.io.config's Config and TrainConfig; that module imports this one,
# so they are annotated by duck type (Any) rather than imported.


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error never echoes a whole (possibly huge) value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise SlimctlError(f"config key '{key}' must be {rule}, got {_shown(value)}")


MAX_EPOCHS = 1_000_000
MAX_LR = 1e30  # also the largest λ; float32 overflows at 3.4e38
MAX_BUDGET = 1e6
MAX_POLARIZATION_T = 1e3  # t weighs the L1 part against the polarizing one, which has weight 1


def validate_train(t: Any, section: str) -> None:
    # Upper bounds: far beyond any real recipe, and below what float32 arithmetic overflows on.
    _check(1 <= t.epochs <= MAX_EPOCHS, f"{section}.epochs", f"in [1, {MAX_EPOCHS:,}]", t.epochs)
    _check(0 < t.lr <= MAX_LR, f"{section}.lr", f"in (0, {MAX_LR:g}]", t.lr)
    _check(0 <= t.momentum < 1, f"{section}.momentum", "in [0, 1)", t.momentum)
    _check(t.weight_decay >= 0, f"{section}.weight_decay", ">= 0", t.weight_decay)
    _check(all(0 < m <= 1 for m in t.milestones), f"{section}.milestones", "fractions in (0, 1]", list(t.milestones))
    _check(0 < t.lr_decay <= 1, f"{section}.lr_decay", "in (0, 1]", t.lr_decay)
    _check(0 <= t.sparsity <= MAX_LR, f"{section}.sparsity", f"in [0, {MAX_LR:g}]", t.sparsity)
    _check(t.sparsity_budget is None or 0 <= t.sparsity_budget <= MAX_BUDGET, f"{section}.sparsity_budget",
           f"in [0, {MAX_BUDGET:g}] or null", t.sparsity_budget)
    if t.sparsity_budget is not None and t.sparsity > 0:
        raise SlimctlError(
            f"config keys '{section}.sparsity' ({t.sparsity:g}) and '{section}.sparsity_budget' ({t.sparsity_budget:g}) "
            "both set the sparsity strength; set one and null the other (e.g. --set train.sparsity_budget=null)"
        )
    _check(0 <= t.seed < 2**63, f"{section}.seed", "in [0, 2^63)", t.seed)
    _check(t.sparsity_on in ("ranked", "all"), f"{section}.sparsity_on", "ranked or all", t.sparsity_on)
    _check(t.regularizer in REGULARIZERS, f"{section}.regularizer", " or ".join(REGULARIZERS), t.regularizer)
    _check(0 < t.polarization_t <= MAX_POLARIZATION_T, f"{section}.polarization_t",
           f"in (0, {MAX_POLARIZATION_T:g}]", t.polarization_t)
    _check(0 < t.gamma_bound <= MAX_BUDGET, f"{section}.gamma_bound", f"in (0, {MAX_BUDGET:g}]", t.gamma_bound)
    if t.regularizer == "l1" and (t.polarization_t, t.gamma_bound) != (1.0, 1.0):
        raise SlimctlError(f"config keys '{section}.polarization_t' and '{section}.gamma_bound' apply only with "
                           f"{section}.regularizer: polarization (it is l1); set the regularizer or drop them")
    _check(t.device in DEVICES, f"{section}.device", f"one of {', '.join(DEVICES)}", t.device)
    _check(t.precision in PRECISIONS, f"{section}.precision", f"one of {', '.join(PRECISIONS)}", t.precision)
    _check(isinstance(t.compile, bool) or t.compile in COMPILE_MODES, f"{section}.compile",
           f"true, false or one of {', '.join(COMPILE_MODES)}", t.compile)


def validate(cfg: Any) -> None:
    """Types and ranges. Names (model.arch, data.name) are checked by the registry and the data
    module when a stage uses them (`slimctl.pipeline.inspection.check_names`)."""
    _check(cfg.model.width > 0, "model.width", "> 0", cfg.model.width)
    d = cfg.data
    _check(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    _check(d.test_batch_size >= 1, "data.test_batch_size", ">= 1", d.test_batch_size)
    _check(d.subset is None or d.subset >= 1, "data.subset", ">= 1 or null", d.subset)
    _check(d.holdout is None or (d.holdout >= 1 and d.name != "imagefolder"), "data.holdout",
           ">= 1 or null, with a tensor data set (an imagefolder has its own val/ folder)", d.holdout)
    _check(d.workers >= 0, "data.workers", ">= 0", d.workers)
    _check(0 <= d.seed < 2**63, "data.seed", "in [0, 2^63)", d.seed)
    _check(d.image_size is None or (d.name == "imagefolder" and d.image_size >= 8), "data.image_size",
           "null, or >= 8 with data.name imagefolder (CIFAR and digits are 32×32)", d.image_size)
    validate_train(cfg.train, "train")
    for key in ("sparsity", "sparsity_budget"):
        if getattr(cfg.finetune, key) not in (None, 0):
            raise SlimctlError(
                f"config key 'finetune.{key}' must be 0 or unset: fine-tuning never applies the sparsity term"
            )
    validate_train(cfg.finetune_train(), "finetune")
    kd = cfg.finetune.distill
    _check(0 <= kd.alpha <= 1, "finetune.distill.alpha", "in [0, 1]", kd.alpha)
    _check(kd.temperature > 0, "finetune.distill.temperature", "> 0", kd.temperature)
    validate_ratio(cfg.prune.ratio, "prune.ratio")
    _check(cfg.prune.min_channels >= 1, "prune.min_channels", ">= 1", cfg.prune.min_channels)
