"""A checkpoint's history: it and the parents it records, each checked against its recorded sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimctl.base.files import file_sha256
from slimctl.core.flops import count_flops, count_params
from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint


def lineage(checkpoint: Path) -> list[dict[str, Any]]:
    """The checkpoint and its recorded parents, oldest first. A parent that is gone ends the chain;
    so does one replaced since it was recorded (its sha256 differs): the row that names it says so
    (`parent_replaced`), and nothing of the new file is shown as this model's history."""
    rows = []
    path: Path | None = checkpoint
    seen = set()
    while path is not None and (not rows or path.exists()) and path.resolve() not in seen:
        seen.add(path.resolve())
        ckpt = load_checkpoint(path)  # the first one must exist: "checkpoint not found" otherwise
        metrics = ckpt.get("metrics") or {}
        if not all(isinstance(metrics.get(k), int) for k in ("params", "flops")):  # recorded by every stage
            model = model_from_checkpoint(ckpt, source=str(path))
            metrics = {**metrics, "params": count_params(model), "flops": count_flops(model)}
        env = metrics.get("environment")
        row = {"stage": ckpt["stage"], "path": str(path), "params": metrics["params"],
               "flops": metrics["flops"], "top1": metrics.get("top1"),
               "environment": env if isinstance(env, dict) else None}
        parent = ckpt.get("parent")
        path = Path(parent["path"]) if parent else None
        if path is not None and path.is_file() and file_sha256(path) != parent["sha256"]:
            row["parent_replaced"], path = str(path), None
        rows.append(row)
    return rows[::-1]
