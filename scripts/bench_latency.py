"""Pruned means faster? FLOPs cut against measured speed-up, slimctl beside Torch-Pruning.

    python scripts/bench_latency.py [--models resnet18,mobilenet_v2] [--runtimes torch,onnxruntime]
        [--batch-sizes 1,16] [--ratio 0.5] [--size 224] [--markdown FILE]

For each torchvision model (random weights, γ ~ U(0, 1) seeded: the structure and speed of a prune
do not need a trained model) and each cell (runtime × batch size), each slimctl variant is pruned
for that cell, as a user deploying there would (`--runtime R --latency-batch B`):
  slimctl       `prune --ratio R` with the defaults (exact compensation, coupled channels kept, the
                speed check, which writes a faster alternative cut when the first one is not clearly
                faster)
  auto          the same with `--round-to auto`
  latency       `prune --target-latency F`, F = the time fraction slimctl's default reached in the
                cell (so it aims at the same speed by measurement instead of by γ alone); the cell
                shows the speed-up aimed at, and the one `slimctl bench` measures in its own process
                (`--precision fp32`, the cell's runtime and batch size), which the goal is judged by
  coupled       `prune --coupled mean --round-to auto --target-flops N`, N = the FLOPs of slimctl's
                default in the cell: residual-coupled channels pruned too, ranked by the mean |γ| of
                the set (as Torch-Pruning's group importance does), and of γ's counts, the
                multiples of 8 and 16 and whole groups of grouped convs that meet N, the fastest here
  flops         `prune --round-to auto --target-flops N`: residual-coupled channels kept (the default),
                the counts chosen by measurement, at the FLOPs of slimctl's default in the cell
An `auto`, `coupled` or `flops` cell tagged `groups` is one where `--round-to auto` chose whole groups
of grouped convolutions dropped (fewer groups of the original width).
  TP none / TP 8  Torch-Pruning (pip install torch-pruning; only this script uses it): BN-scale
                importance, global pruning, the final classifier ignored, its pruning ratio
                searched until its FLOPs match slimctl's default in the cell within 1%; round_to
                None and 8
Every model is timed as deployed (BNs folded into the convs, eval, inference mode, fp32) in
alternating rounds with the unpruned model in the same process; the speed-up is unpruned / pruned
(median of medians), with the FLOPs removed beside it. A summary scores the issue's goals: cells
where slimctl's default is slower than the original, cells and models where it is at least as fast
as Torch-Pruning's better setting, and latency targets met within ±10%.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import click
import torch
from torch import nn

from slimctl import (Deploy, PruneOptions, count_flops, create_model, environment, fold_bn, latency_timer,
                     load_model, machine_label, make_checkpoint, parse_latency, parse_target, prune_checkpoint,
                     save_checkpoint)

MODELS = ("resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,efficientnet_b0,regnet_x_400mf,resnext50_32x4d,"
          "densenet121,shufflenet_v2_x1_0")


def random_gammas(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g)
    return model.eval()


def torch_pruning(model: nn.Module, *, flops: int, size: int, round_to: int | None) -> nn.Module:
    """Torch-Pruning's BN-scale global pruning at the pruning ratio whose FLOPs match `flops` (±1%)."""
    import copy

    import torch_pruning as tp

    example = torch.zeros(1, 3, size, size)

    def pruned_at(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.BNScaleImportance(), global_pruning=True,
                                      pruning_ratio=ratio, ignored_layers=head, round_to=round_to)
        pruner.step()
        return m.eval()

    low, high, best = 0.0, 0.95, None
    for _ in range(14):  # bisection on TP's ratio; its FLOPs fall as the ratio grows
        mid = (low + high) / 2
        candidate = pruned_at(mid)
        got = count_flops(candidate, (3, size, size))
        best = candidate if best is None or abs(got - flops) < abs(count_flops(best, (3, size, size)) - flops) else best
        if abs(got - flops) <= 0.01 * flops:
            return candidate
        low, high = (mid, high) if got > flops else (low, mid)
    return best


def timers(models: dict[str, nn.Module], *, runtime: str, batch_size: int, size: int) -> dict[str, Callable]:
    return {name: latency_timer(fold_bn(m), batch_size=batch_size, input_size=(3, size, size), runtime=runtime)
            for name, m in models.items()}


def speedups(models: dict[str, nn.Module], *, runtime: str, batch_size: int, size: int, rounds: int,
             repeats: int) -> dict[str, float]:
    """unpruned / variant latency for every variant, alternating `rounds` times (medians)."""
    clocks = timers(models, runtime=runtime, batch_size=batch_size, size=size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, clock in clocks.items():
            times[name].append(clock(repeats=repeats, warmup=2))
    base = statistics.median(times["unpruned"])
    return {name: base / statistics.median(t) for name, t in times.items() if name != "unpruned"}


def bench_speedup(source: Path, pruned: Path, deploy: Deploy) -> float:
    """The speed-up `slimctl bench SOURCE PRUNED` measures in its own process under `deploy`'s conditions
    (fp32): how a user checks a latency target."""
    command = [sys.executable, "-m", "slimctl", "bench", str(source), str(pruned), "--batch-sizes",
               str(deploy.batch_size), "--runtime", deploy.runtime, "--precision", "fp32", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[-1]["speedup"]


class Model:
    """One model's unpruned network, its checkpoint, and the pruned variants built so far."""

    def __init__(self, name: str, *, size: int, seed: int, folder: Path) -> None:
        self.name, self.size, self.folder = name, size, folder
        self.model = random_gammas(create_model(f"torchvision.{name}", 1000, input_size=(3, size, size)), seed)
        self.source = folder / f"{name}.pt"
        save_checkpoint(self.source, make_checkpoint(self.model, stage="sparse-train"))
        self.flops = count_flops(self.model)
        self.tp_cache: dict[tuple[int | None, int], nn.Module] = {}

    def prune(self, tag: str, deploy: Deploy, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
        out = self.folder / f"{self.name}-{tag}.pt"
        options = PruneOptions(round_to=kwargs.pop("round_to", 1), coupled=kwargs.pop("coupled", "keep"), deploy=deploy)
        result = prune_checkpoint(self.source, out, evaluate_model=False, force=True, options=options, **kwargs)
        return load_model(out), result

    def torch_pruning(self, flops: int, round_to: int | None) -> nn.Module:
        key = (round_to, round(200 * flops / self.flops))  # matched within 0.5%: reuse
        if key not in self.tp_cache:
            self.tp_cache[key] = torch_pruning(self.model, flops=flops, size=self.size, round_to=round_to)
        return self.tp_cache[key]


def cell_variants(m: Model, deploy: Deploy, *, ratio: float, tp_settings: list[int | None]
                  ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The variants pruned for one cell, and per variant a note for its cell (the alternative the speed
    check wrote; the speed-up a latency target aimed at)."""
    out, notes = {"unpruned": m.model}, {}
    out["slimctl"], result = m.prune("default", deploy, ratio=ratio)
    notes["slimctl"] = SHORT.get((result["speed"] or {}).get("adopted"), "")

    def noted(tag: str, **kwargs: Any) -> nn.Module:  # a cut with whole groups dropped says so in its cell
        model, pruned = m.prune(tag, deploy, **kwargs)
        if (pruned["widths"] or {}).get("chosen") == "whole groups":
            notes[tag] = "groups"
        return model

    builders: dict[str, Callable[[], nn.Module]] = {"auto": lambda: noted("auto", ratio=ratio, round_to="auto")}
    speed = result["speed"] if "pruned_ms" in (result["speed"] or {}) else {"pruned_ms": 0.95, "unpruned_ms": 1}
    fraction = min(0.95, speed["pruned_ms"] / speed["unpruned_ms"])

    def latency() -> nn.Module:
        model, _ = m.prune("latency", deploy, target=parse_latency(f"{fraction:.3f}", **asdict(deploy)))
        checked = bench_speedup(m.source, m.folder / f"{m.name}-latency.pt", deploy)
        notes["latency"] = f"aim {1 / fraction:.2f}×, bench {checked:.2f}×"
        return model

    builders["latency"] = latency
    builders["coupled"] = lambda: noted("coupled", coupled="mean", round_to="auto",
                                        target=parse_target("flops", str(count_flops(out["slimctl"]))))
    builders["flops"] = lambda: noted("flops", round_to="auto",
                                      target=parse_target("flops", str(count_flops(out["slimctl"]))))
    for round_to in tp_settings:
        builders[f"TP {round_to or 'none'}"] = lambda r=round_to: m.torch_pruning(count_flops(out["slimctl"]), r)
    for tag, build in builders.items():
        try:
            out[tag] = build()
        except Exception as exc:  # noqa: BLE001 - one variant failing (a peer's tracer, a target) keeps the others
            click.echo(f"{m.name} {tag} {deploy.runtime} bs {deploy.batch_size}: failed "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", err=True)
            notes[tag] = "failed"
    return out, notes


# What the speed check wrote instead of the first cut, in a cell: short tags.
SLOWER_BY = 0.05  # prune's speed check margin (slimctl.pipeline.latency.SLOWER_BY)
SHORT = {"gathers kept whole": "whole", "multiples of 8": "8s", "multiples of 16": "16s",
         "gathers kept whole, multiples of 8": "whole, 8s", "gathers kept whole, multiples of 16": "whole, 16s",
         "whole groups": "groups"}


def _figure(note: str, label: str, default: float | None = None) -> float:
    """The speed-up after `label` in a cell's note ("aim 1.52×, bench 1.49×"), or `default` without one."""
    if label not in note:
        return default
    return float(note.split(label)[1].split("×")[0])


# slimctl's variants at the FLOPs of its default in the cell, the ones set against Torch-Pruning's.
EQUAL_FLOPS = ("slimctl", "coupled", "flops")


def summary(results: dict[str, dict[tuple[str, int], dict[str, tuple[float, str]]]]) -> list[str]:
    """The goals, counted: slower cells, cells and models at least as fast as Torch-Pruning's better
    setting, latency targets met within ±10%."""
    cells = [(name, cell, row) for name, by_cell in results.items() for cell, row in by_cell.items()]
    slower = [f"{name} {cell[0]} bs {cell[1]} ({row['slimctl'][0]:.2f}×)" for name, cell, row in cells
              if row["slimctl"][0] < 1]
    beyond = [name for name, cell, row in cells if row["slimctl"][0] < 1 / (1 + SLOWER_BY)]
    lines = [f"slimctl's default below 1.00× in {len(slower)} of {len(cells)} cells"
             + (f": {', '.join(slower)}" if slower else "")
             + f"; slower beyond the speed check's {SLOWER_BY:.0%} noise margin in {len(beyond)}"]
    contested = [(name, cell, row) for name, cell, row in cells if any(k.startswith("TP") for k in row)]
    won = {(name, cell): max(row[v][0] for v in EQUAL_FLOPS if v in row) >=
           max(v[0] for k, v in row.items() if k.startswith("TP")) for name, cell, row in contested}
    models = sorted({name for name, _ in won})
    all_won = [name for name in models if all(w for (n, _), w in won.items() if n == name)]
    lines.append(f"slimctl's best setting ({', '.join(EQUAL_FLOPS)}) at least as fast as Torch-Pruning's better "
                 f"setting at the same FLOPs: {sum(won.values())} of "
                 f"{len(won)} cells; in every cell on {len(all_won)} of {len(models)} models ({', '.join(all_won)})")
    aimed = [(_figure(row["latency"][1], "bench ", row["latency"][0]), _figure(row["latency"][1], "aim "))
             for _, _, row in cells if "aim " in row.get("latency", (0, ""))[1]]
    within = sum(abs(got / aim - 1) <= 0.10 for got, aim in aimed)
    failed = sum(row.get("latency", (0, ""))[1] == "failed" for _, _, row in cells)  # unreachable: a miss
    lines.append(f"--target-latency within ±10% of its aim, as `slimctl bench` measures: {within} of "
                 f"{len(aimed) + failed} cells"
                 + (f" ({failed} unreachable)" if failed else ""))
    return lines


@click.command()
@click.option("--models", default=MODELS, show_default=True, help="Comma-separated torchvision model names.")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="slimctl's prune ratio.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True, help="Input height = width.")
@click.option("--runtimes", default="torch,onnxruntime", show_default=True)
@click.option("--batch-sizes", default="1,16", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--no-torch-pruning", is_flag=True, help="Skip the Torch-Pruning columns.")
@click.option("--seed", default=0, show_default=True)
@click.option("--markdown", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(models: str, ratio: float, size: int, runtimes: str, batch_sizes: str, rounds: int, repeats: int,
         no_torch_pruning: bool, seed: int, markdown: Path | None) -> None:
    cells = [(r, int(b)) for r in runtimes.split(",") for b in batch_sizes.split(",")]
    tp_settings = [] if no_torch_pruning else [None, 8]
    header = ["model", "variant", *(f"{r} bs {b}" for r, b in cells)]
    results: dict[str, dict[tuple[str, int], dict[str, tuple[float, str]]]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models.split(","):
            m = Model(name, size=size, seed=seed, folder=Path(tmp))
            results[name] = {}
            for cell in cells:
                found, notes = cell_variants(m, Deploy(cell[0], cell[1]), ratio=ratio, tp_settings=tp_settings)
                measured = speedups(found, runtime=cell[0], batch_size=cell[1], size=size, rounds=rounds,
                                    repeats=repeats)
                results[name][cell] = {
                    v: (x, ", ".join(filter(None, [f"{100 * (1 - count_flops(found[v]) / m.flops):.0f}%",
                                                   notes.get(v)])))
                    for v, x in measured.items()}
                if notes.get("latency") == "failed":  # the target was unreachable there: a miss, shown as such
                    results[name][cell]["latency"] = (0.0, "failed")
                click.echo(f"{name} {cell}: " + "; ".join(f"{v} {x:.2f}× ({n})"
                                                          for v, (x, n) in results[name][cell].items()), err=True)
            for variant in ("slimctl", "auto", "latency", "coupled", "flops",
                            *(f"TP {r or 'none'}" for r in tp_settings)):
                rows.append([name, variant, *(f"{results[name][c][variant][0]:.2f}× ({results[name][c][variant][1]})"
                                              if results[name][c].get(variant, (0, "failed"))[1] != "failed"
                                              else "failed" for c in cells)])
    machine = machine_label(environment(torch.device("cpu"), None))
    text = "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *rows])
    goals = "\n".join(f"- {line}" for line in summary(results))
    click.echo(f"speed-up = unpruned / pruned latency (FLOPs removed), BNs folded, fp32, {size}×{size}; "
               f"{machine}\n\n{text}\n\n{goals}")
    if markdown is not None:
        markdown.write_text(f"{machine}\n\n{text}\n\n{goals}\n")


if __name__ == "__main__":
    main()
