"""prune's speed check, and what it does when pruning made the model slower.

The pruned model is timed against the unpruned one as deployed (`slimctl.pipeline.latency.Deploy`:
runtime, batch, threads, precision). When it is not faster beyond the noise margins (slower, or
within them: a DenseNet cut measured 0.99× in the check and 0.94× after), the same cut is built the
ways that most often undo a slowdown, each timed under the same conditions:
- *gathers kept whole*: the spaces the plan cuts through a selection (a DenseNet concatenation, a
  ShuffleNet split) keep their width, since a gather plus a full-width BN and ReLU can cost more
  than the narrower consumer saves;
- *multiples of 8 / 16*: every cut count rounded up (the next-highest γ), for kernel libraries whose
  blocked layouts want such widths (onnxruntime's depthwise convolutions run at half the time);
- both together, when the plan has gathers;
- *whole groups*: on a model with grouped convolutions, some groups dropped instead of channels in
  every group (`slimctl.core.grouped`): narrow groups run poorly (RegNet-X under onnxruntime kept
  nearly its whole width in multiples of 16 a group, 1.02×; with whole groups it cut 41% of its
  FLOPs, 1.42×, docs/deploy.md).
The fastest is written instead when it beats the first cut by more than PREFER_FEWER; the record
keeps every time measured and which was chosen, and prune says so. A model that is still slower is
warned about.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimctl.core.grouped import linked_sets, whole_groups
from slimctl.core.plan import ChannelPlan
from slimctl.core.surgery import applied_plan
from slimctl.pipeline.latency import Deploy, is_faster, is_slower, speed_check, time_alternatives
from slimctl.pipeline.widths import PREFER_FEWER, distinct, rounded_plans


def checked_speed(model: nn.Module, plan: ChannelPlan, pruned: nn.Module, notes: list, *, compensate: str,
                  deploy: Deploy, alternatives: bool = True) -> tuple[dict[str, Any], ChannelPlan, nn.Module, list]:
    """(the speed record, and the plan, pruned model and compensation notes to write). With
    `alternatives` (prune's default), a model not clearly faster is replaced by the fastest
    alternative cut (module docstring), which `record["adopted"]` names."""
    record = speed_check(model, pruned, deploy)
    if not alternatives or is_faster(record["pruned_ms"], record["unpruned_ms"]):
        return record, plan, pruned, notes
    options = alternative_plans(model, plan, compensate)
    built = {name: applied_plan(model, p, compensate=compensate) for name, p in options.items()}
    times = time_alternatives(model, {"as cut": pruned, **{name: b[0].eval() for name, b in built.items()}},
                              deploy.target("alternatives", repeats=10))
    unpruned_ms = times.pop("unpruned")
    best = min(times, key=times.get)
    record["alternatives"] = times
    if best == "as cut" or times[best] >= times["as cut"] * (1 - PREFER_FEWER):
        return record, plan, pruned, notes
    pruned, new_notes, new_plan = built[best]
    record.update(adopted=best, first_ms=times["as cut"], unpruned_ms=unpruned_ms, pruned_ms=times[best],
                  speedup=unpruned_ms / times[best], slower=is_slower(times[best], unpruned_ms))
    return record, new_plan, pruned.eval(), new_notes


def alternative_plans(model: nn.Module, plan: ChannelPlan, compensate: str) -> dict[str, ChannelPlan]:
    """The cuts the speed check tries beside `plan` (module docstring), the same ones only once, and
    only those that still remove a channel (rounding a narrow model up can keep every channel)."""
    gathered = plan.gathered()
    options = {"as cut": plan, **({"gathers kept whole": plan.keeping(gathered)} if gathered else {})}
    for name, rounded in rounded_plans(model, plan, compensate=compensate).items():
        options[name] = rounded
        if gathered:
            options[f"gathers kept whole, {name}"] = rounded.keeping(gathered)
    if linked_sets(model, plan):
        options["whole groups"] = whole_groups(model, plan)
    return {name: p for name, p in distinct(options).items() if name != "as cut" and p.kept < p.total}
