"""Is the pruned model what its mode promises? Measured on every prune, not assumed.

`exact` promises the original with only the removed channels' γ zeroed, `none` the original with γ
and β zeroed (`slimctl.core.compensate`); `bias` promises nothing exact (it keeps a spatial mean only).
`measure_exactness` runs both on one fixed probe batch at the model's input size and reports the
largest difference of their outputs relative to the reference's largest output. Above `THRESHOLD`
it also names where the difference starts: the layers whose kept outputs differ while their kept
inputs agree (a second, hooked pass: only then is every layer's input and output held).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimctl.core.compensate import gamma_zeroed
from slimctl.errors import SlimctlError
from slimctl.core.plan import ChannelPlan, plan_masks
from slimctl.base.registry import input_size

THRESHOLD = 1e-4  # relative; float32 rounding over a deep network stays near 1e-6
PROBE_BATCH = 2
PROBE_SEED = 0


@dataclass(frozen=True)
class Exactness:
    mode: str
    max_rel_diff: float  # max |pruned − reference| / max |reference| over the probe's outputs
    input_size: tuple[int, ...]  # (C, H, W) of the probe
    consumers: tuple[str, ...] = ()  # layers where the difference starts (only when above THRESHOLD)

    @property
    def promised(self) -> bool:
        """Whether the mode promises an exact result (`bias` does not)."""
        return self.mode != "bias"

    @property
    def exact(self) -> bool:
        return self.max_rel_diff < THRESHOLD

    def warning(self) -> str | None:
        """One line for the user when the promise does not hold, else None."""
        if not self.promised or self.exact:
            return None
        where = f", first at {', '.join(self.consumers[:5])}" if self.consumers else ""
        return (f"the pruned model differs from the original with the removed channels' "
                f"{'γ and β' if self.mode == 'none' else 'γ'} zeroed by {self.max_rel_diff:.1e} "
                f"(relative; above {THRESHOLD:g}){where}")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "max_rel_diff": self.max_rel_diff, "threshold": THRESHOLD,
                "exact": self.exact, "input_size": list(self.input_size), "consumers": list(self.consumers)}


@torch.no_grad()
def measure_exactness(model: nn.Module, pruned: nn.Module, plan: ChannelPlan, mode: str) -> Exactness:
    """`pruned` (from `model` by `plan` in `mode`) against the reference the mode promises, on a
    fixed random batch at the model's input size (both in eval mode; their modes are restored)."""
    reference = gamma_zeroed(model, plan, beta=mode == "none").eval()
    weight = next(model.parameters())
    size = tuple(input_size(model))
    probe = torch.randn(PROBE_BATCH, *size, generator=torch.Generator().manual_seed(PROBE_SEED)).to(weight)
    training = pruned.training
    try:
        pruned.eval()
        wanted = _tensors(reference(probe))
        try:
            got = _tensors(pruned(probe))
        except RuntimeError as exc:  # e.g. a reshape to a channel count fixed in the model's code
            detail = str(exc).splitlines()[0][:200]
            raise SlimctlError(
                f"{type(model).__name__}: the pruned model does not run ({detail}): one of its layers reads "
                "channels in a way the traced graph does not show; declare channel_groups() by hand"
            ) from None
        diff = _rel_diff(got, wanted)
        consumers = () if diff < THRESHOLD else _where_it_starts(model, reference, pruned, plan, probe)
    finally:
        pruned.train(training)
    return Exactness(mode, diff, size, consumers)


def _where_it_starts(model: nn.Module, reference: nn.Module, pruned: nn.Module, plan: ChannelPlan,
                     probe: torch.Tensor) -> tuple[str, ...]:
    """Conv/Linear layers, in the order they run, whose kept outputs differ while their kept inputs agree."""
    out_keep, in_mask, _ = plan_masks(dict(model.named_modules()), plan)
    seen: dict[str, list] = {}
    order: list[str] = []

    def record(name: str, slot: int):
        def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pair = seen.setdefault(name, [None, None])
            pair[slot] = (args[0].detach(), output.detach())
            if slot == 1 and name not in order:
                order.append(name)
        return hook

    handles = []
    for slot, net in enumerate((reference, pruned)):
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(record(name, slot)))
    try:
        reference(probe)
        pruned(probe)
    finally:
        for h in handles:
            h.remove()
    found = []
    for name in order:
        (ref_in, ref_out), (in_, out) = seen[name]
        if ref_in is None:
            continue
        cols, rows = in_mask.get(name), out_keep.get(name)
        ref_in = ref_in if cols is None else ref_in[:, cols.to(ref_in.device)]
        ref_out = ref_out if rows is None else ref_out[:, rows.to(ref_out.device)]
        if ref_in.shape != in_.shape or ref_out.shape != out.shape:
            continue
        if _rel_diff([in_], [ref_in]) < THRESHOLD <= _rel_diff([out], [ref_out]):
            found.append(name)
    return tuple(found)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple or list, a dict, a named tuple)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _rel_diff(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    scale = max((float(r.abs().max()) for r in references if r.numel()), default=0.0)
    diff = max((float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, references) if r.numel()),
               default=0.0)
    if len(outputs) != len(references) or any(o.shape != r.shape for o, r in zip(outputs, references)):
        return float("inf")
    return diff / scale if scale > 0 else diff
