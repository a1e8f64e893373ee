"""Prove slimctl's pruning contract over the model zoo: pruned(x) equals the original with the removed
channels zeroed, for every torchvision classification model and a broad sample of timm CNNs.

    OMP_NUM_THREADS=1 python scripts/check_exact.py                 # 80 torchvision + 60 timm models
    python scripts/check_exact.py --timm 0 --json /tmp/exact_tv.json --markdown /tmp/exact_tv.md
    python scripts/check_exact.py --no-torchvision --timm 200 --timeout 300   # the whole timm sample (88)
    python scripts/check_exact.py --models torchvision.resnet18,timm.tf_efficientnet_b0 --sizes 96,128
    python scripts/check_exact.py --one timm.mixnet_s      # one model in this process (what each child runs)

The contract (`slimctl.core.surgery`), in eval mode, float32:
  compensate="exact"  pruned(x) == original(x) with γ zeroed at every removed channel
  compensate="none"   pruned(x) == original(x) with γ and β zeroed at every removed channel
The removed channels come from `slimctl.removed_positions`; the reference model is built
here (a copy of the original taken before pruning, those BN entries zeroed), so the check does not
rely on the library's own measurement. Relative difference = max|pruned − ref| / max|ref|, exact
below 1e-4, at every size of `--sizes` (the graph is traced once, at `--trace-size`; a padded conv's
compensation is position-dependent, so a size other than the traced one is the stronger test).
A fixed-size model (MaxViT, 256-only attention nets) is compared at the first of 224/256/299 it runs
at; Inception-v3 is traced at 299 (its auxiliary head, live in slimctl's train-mode trace, needs it).
prune_model's own verdict (its third return value, where it has one) is recorded and any
disagreement with this check is listed, but it never decides a status.

Each model starts from random weights (num_classes=10) and a random, seeded BN state — γ ~ U(0.05, 1.05),
β ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 1.5) — so β-carrying channels are
removed at `--ratio`. Each model runs in its own subprocess (`--one NAME`) under `--timeout`, so a
slow or hanging model cannot stall the run. The JSON records the slimctl commit and a hash of its
sources, since the library may be edited while a long run goes on.

Statuses: exact | refused (prune_model raised SlimctlError: its message is the reason) | skipped
(the model cannot be built or run on CPU at these sizes, is over --max-params, or timed out) |
failed (some difference ≥ 1e-4) | error (any other exception). Exit code 1 if any model failed or
errored, else 0.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

import slimctl
from slimctl import SlimctlError, count_flops, count_params, prune_model, removed_positions

TOLERANCE = 1e-4
MODES = ("exact", "none")
RESULT_PREFIX = "CHECK-EXACT-RESULT "  # the child's one result line on stdout (libraries may print too)
PHASE_PREFIX = "CHECK-EXACT-PHASE "  # progress lines on stderr: where a timed-out child was
TORCHVISION, TIMM = "torchvision.", "timm."
# Tried when the model does not run at --sizes (fixed-size models) or cannot be traced at --trace-size
# (slimctl traces in train mode, where Inception-v3's auxiliary head needs about 299×299).
FALLBACK_SIZES = (224, 256, 299)

# timm models, spread over families, most distinct constructs first (so `--timm 60` covers the
# families; later entries add variants). Names this timm version lacks are skipped and listed.
TIMM_MODELS = (
    # ResNet family: plain, -d (avg-pool downsample), -t, SE/ECA, blur/anti-aliased, ResNeXt
    "resnet18", "resnet26d", "resnet50d", "resnet10t", "seresnext26d_32x4d", "ecaresnet26t", "resnext26ts",
    "resnetblur18", "resnetaa50", "legacy_seresnet18",
    # split-attention / selective-kernel / multi-scale
    "skresnet18", "skresnext50_32x4d", "resnest14d", "res2net50_14w_8s", "res2next50",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_b16", "regnetz_c16",
    # EfficientNet & co. (tf_*: Conv2dSame, asymmetric "SAME" padding)
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "tf_efficientnet_lite0", "tf_efficientnetv2_b0",
    "efficientnetv2_rw_t", "tinynet_a",
    # MobileNets and NAS-found mobile nets
    "mobilenetv2_050", "mobilenetv3_large_100", "mobilenetv3_small_050", "tf_mobilenetv3_small_minimal_100",
    "mixnet_s", "tf_mixnet_s", "mnasnet_100", "semnasnet_050", "spnasnet_100", "fbnetc_100", "lcnet_050",
    "hardcorenas_a",
    # Ghost modules (concat + slice)
    "ghostnet_050", "ghostnetv2_100",
    # dense / dual-path / aggregation / high-resolution
    "densenet121", "dpn68", "dla34", "dla60x_c", "hrnet_w18_small",
    # misc CNNs
    "rexnet_100", "selecsls42b", "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet17",
    "ese_vovnet19b_dw", "vovnet39a", "repvgg_a0", "mobileone_s0", "gernet_s", "resnet51q",
    # Inception / Xception / NAS cells / TResNet
    "inception_v3", "inception_v4", "inception_resnet_v2", "xception41", "legacy_xception", "tresnet_m",
    "nasnetalarge", "pnasnet5large",
    # no BN (refused)
    "convnext_atto",
    # more variants
    "resnest26d", "skresnet34", "cspresnext50", "ese_vovnet39b", "fbnetv3_b", "repghostnet_050", "resnet61q",
    "gcresnext26ts", "bat_resnext26ts", "botnet26t_256", "halonet26t", "lambda_resnet26t", "nf_resnet26",
    "efficientvit_b0", "mobilevit_xxs", "edgenext_xx_small", "vgg11_bn", "dla46_c", "regnetx_004", "mixnet_m",
    "wide_resnet50_2", "xception65",
)


def main() -> int:
    """Parent: run each model in a child, collect, report. Child (`--one`): check one model, print JSON."""
    args = parse_args(sys.argv[1:])
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:
        result = check_one(args.one, sizes=sizes, trace_size=args.trace_size or max(sizes), ratio=args.ratio,
                           seed=args.seed, max_params=args.max_params)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    names, unknown = model_names(args.models, torchvision=args.torchvision, timm_count=args.timm)
    if unknown:
        print(f"not in this torchvision/timm, skipped: {', '.join(unknown)}", flush=True)
    library_state = library_fingerprint()
    start = time.perf_counter()
    results = []
    for i, name in enumerate(names, 1):
        result = run_child(name, args)
        results.append(result)
        print(f"[{i}/{len(names)}] {progress_line(result)}", flush=True)
    elapsed = time.perf_counter() - start
    summary = summarize(results)
    report = {"config": {k: v for k, v in vars(args).items() if k != "one"}, "library": library_state,
              "elapsed_s": round(elapsed, 1), "unknown_names": unknown, "summary": summary, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(results, sizes, args.ratio))
    print(summary_line(summary, elapsed), flush=True)
    return 1 if summary["counts"].get("failed", 0) or summary["counts"].get("error", 0) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The CLI; the parent passes --sizes/--ratio/--seed/--max-params/--trace-size on to each child."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torchvision", action=argparse.BooleanOptionalAction, default=True,
                   help="check every torchvision classification model (default: yes)")
    p.add_argument("--timm", type=int, default=60, metavar="N",
                   help=f"check the first N models of the curated timm sample that this timm has "
                        f"({len(TIMM_MODELS)} names; 0: none)")
    p.add_argument("--models", help="explicit comma-separated list (torchvision.<name>, timm.<name>); "
                                    "overrides --torchvision/--timm")
    p.add_argument("--sizes", default="96,128", help="input sizes (H = W) compared, comma-separated")
    p.add_argument("--trace-size", type=int, help="input size the graph is traced at (default: the largest of --sizes)")
    p.add_argument("--ratio", type=float, default=0.5, help="prune ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random BN state and inputs")
    p.add_argument("--timeout", type=float, default=120, help="seconds per model (its subprocess is killed after)")
    p.add_argument("--max-params", type=float, default=200e6,
                   help="skip models with more parameters (CPU memory: pruning holds several copies)")
    p.add_argument("--json", help="write every result and the summary here")
    p.add_argument("--markdown", help="write a results table here")
    p.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)  # child mode: check one model, print JSON
    return p.parse_args(argv)


def model_names(models: str | None, *, torchvision: bool, timm_count: int) -> tuple[list[str], list[str]]:
    """(the names to check, the requested names this environment does not have)."""
    if models:
        return [m.strip() for m in models.split(",") if m.strip()], []
    names, unknown = [], []
    if torchvision:
        import torchvision as tv

        names += [TORCHVISION + n for n in sorted(tv.models.list_models(module=tv.models))]
    if timm_count > 0:
        try:
            import timm
        except ImportError:
            print("timm is not importable: no timm models checked", flush=True)
            return names, unknown
        picked = 0
        for n in TIMM_MODELS:
            if picked == timm_count:
                break
            if timm.is_model(n):
                names.append(TIMM + n)
                picked += 1
            else:
                unknown.append(n)
    return names, unknown


def library_fingerprint() -> dict[str, str]:
    """Which slimctl was checked: its git commit and a hash of its sources (uncommitted edits change it)."""
    root = os.path.dirname(os.path.abspath(slimctl.__file__))
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(folder, f), "rb") as fh:
                    digest.update(f.encode() + fh.read())
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"commit": commit, "sources_sha1": digest.hexdigest()[:12]}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Check one model in a fresh interpreter under a timeout: a hang, a crash or a memory blow-up
    costs that model only, and every model starts from the same clean process state."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--sizes", args.sizes, "--ratio", str(args.ratio),
           "--seed", str(args.seed), "--max-params", str(args.max_params)]
    if args.trace_size:
        cmd += ["--trace-size", str(args.trace_size)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {"model": name, "status": "skipped", "elapsed_s": round(time.perf_counter() - start, 1),
                "reason": f"timeout after {args.timeout:g} s during {last_phase(stderr)}"}
    elapsed = round(time.perf_counter() - start, 1)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "elapsed_s": elapsed}
    tail = " | ".join([line for line in proc.stderr.strip().splitlines() if not line.startswith(PHASE_PREFIX)][-3:])
    return {"model": name, "status": "error", "elapsed_s": elapsed,
            "reason": f"child exited with code {proc.returncode} during {last_phase(proc.stderr)}: {tail[-500:]}"}


def last_phase(stderr: str) -> str:
    """The child's last reported phase: where a killed or crashed child was."""
    phases = [line[len(PHASE_PREFIX):] for line in stderr.splitlines() if line.startswith(PHASE_PREFIX)]
    return phases[-1] if phases else "start-up"


# --------------------------------------------------------------------------- one model (child process)


class Skip(Exception):
    """The model cannot be checked here (not built, does not run at these sizes, too large): not a failure."""


def check_one(name: str, *, sizes: list[int], trace_size: int, ratio: float, seed: int,
              max_params: float) -> dict[str, Any]:
    """One model's status and measurements; every exception becomes a status, never a traceback."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # the random conv / linear init: a rerun checks the same weights
    record: dict[str, Any] = {"model": name}
    try:
        outcome = check_model(name, sizes=sizes, trace_size=trace_size, ratio=ratio, seed=seed,
                              max_params=max_params, record=record)
        record.pop("phase")  # kept for errors only
        return {**record, **outcome}
    except Skip as exc:
        record.pop("phase", None)
        return {**record, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 — anything else is the `error` status
        return {**record, "status": "error", "reason": f"{type(exc).__name__}: {one_line(str(exc))} "
                                                       f"(during {record.get('phase')}, at {raised_at(exc)})"}


def check_model(name: str, *, sizes: list[int], trace_size: int, ratio: float, seed: int, max_params: float,
                record: dict[str, Any]) -> dict[str, Any]:
    """Build, randomize, prune in both modes, compare with the zeroed references. `record` collects
    what is known so far, so an exception later still reports it."""
    phase(record, "build")
    model = build_model(name, max_params=max_params)
    randomize_bn(model, seed)
    model.eval()
    record["bns"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    record["params"] = count_params(model)
    phase(record, "original forward")
    checked, why_not = runnable_sizes(model, sizes, seed)
    if not checked:  # a fixed-size model (ViT, MaxViT, 256-only attention nets): its own size, if it runs
        checked, _ = runnable_sizes(model, list(FALLBACK_SIZES), seed)
    if not checked:
        raise Skip(f"does not run at any of --sizes nor at {'/'.join(map(str, FALLBACK_SIZES))}: {why_not}")
    record["sizes"] = checked
    trace_size = traceable_size(model, [trace_size, *sorted(checked, reverse=True), *FALLBACK_SIZES], seed)
    record["trace_size"] = trace_size
    # slimctl traces (and measures the compensation constants) at registry.input_size(model).
    model.arch_spec = {"arch": None, "input_size": (3, trace_size, trace_size)}
    pristine = copy.deepcopy(model)  # the reference is built from the model as it was before pruning
    inputs = {s: torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed + s)) for s in checked}

    diffs: dict[str, dict[str, float]] = record.setdefault("diffs", {})
    failures: list[str] = []
    for mode in MODES:
        phase(record, f"prune {mode}")
        try:
            result = prune_model(model, ratio, compensate=mode)
        except SlimctlError as exc:
            return {"status": "refused", "reason": one_line(str(exc)), "refused_mode": mode}
        pruned, plan = result[0], result[1]
        pruned.eval()
        record["pruned"] = True
        if len(result) > 2:  # the library's own verdict, recorded to compare with ours, never used for it
            record.setdefault("library_exactness", {})[mode] = one_line(repr(result[2]))[:300]
            record.setdefault("library_says_exact", {})[mode] = getattr(result[2], "exact", None)
        phase(record, f"reference {mode}")
        removed = removed_positions(model, plan)
        record.setdefault("removed_channels", {})[mode] = int(sum(p.numel() for p in removed.values()))
        ref = zeroed_reference(pristine, removed, zero_beta=(mode == "none"))
        diffs[mode] = {}
        for s in checked:
            phase(record, f"compare {mode} {s}")
            with torch.no_grad():
                want = as_tensor(ref(inputs[s]))
            try:
                with torch.no_grad():
                    got = as_tensor(pruned(inputs[s]))
            except Exception as exc:  # noqa: BLE001
                raise RuntimeError(f"forward of the {mode}-pruned model at {s}×{s}: "
                                   f"{type(exc).__name__}: {one_line(str(exc))}") from exc
            if got.shape != want.shape:
                failures.append(f"{mode} @{s}: output shape {tuple(got.shape)} != {tuple(want.shape)}")
                diffs[mode][str(s)] = float("nan")
                continue
            diff = relative_diff(got, want)
            diffs[mode][str(s)] = diff
            if not diff < TOLERANCE:
                failures.append(f"{mode} @{s}: rel. diff {diff:.3g}")
        if any(not d < TOLERANCE for d in diffs[mode].values()):
            record.setdefault("library_notes", {})[mode] = [one_line(n) for n in result.notes][:20]
        if mode == "exact":
            record["params_pruned"] = count_params(pruned)
            record["flops"], record["flops_pruned"] = flops_pair(pristine, pruned, trace_size)
        del pruned, ref
    phase(record, "input unchanged")
    changed = changed_entries(pristine, model)
    if changed:
        failures.append(f"prune_model changed its input model: {', '.join(changed[:3])}")
    if failures:
        return {"status": "failed", "reason": "; ".join(failures)}
    return {"status": "exact", "reason": ""}


def phase(record: dict[str, Any], what: str) -> None:
    """Where the check is: kept in the record (an exception names it) and printed for the parent
    (a timed-out child names it)."""
    record["phase"] = what
    print(PHASE_PREFIX + what, file=sys.stderr, flush=True)


def build_model(name: str, *, max_params: float) -> nn.Module:
    """A randomly initialised classifier with 10 classes (the model's default head where the
    constructor refuses num_classes). Too-large models are skipped from a meta-device build first,
    which allocates nothing, so a 600M-parameter model costs no memory to rule out."""
    constructor = model_constructor(name)
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in constructor().parameters())
        if n > max_params:
            raise Skip(f"{n / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M")
    except Skip:
        raise
    except Exception:  # noqa: BLE001 — some constructors compute on tensors (.tolist()): build for real
        pass
    model = constructor()
    n = sum(p.numel() for p in model.parameters())
    if n > max_params:
        raise Skip(f"{n / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M")
    return model.float()


def model_constructor(name: str) -> Callable[[], nn.Module]:
    """A zero-argument builder for `torchvision.<name>` / `timm.<name>` (a bare name is torchvision's);
    Skip if the name or its arguments are not accepted."""
    if name.startswith(TIMM):
        import timm

        arch = name[len(TIMM):]
        if not timm.is_model(arch):
            raise Skip(f"not a model in timm {timm.__version__}")
        return with_fallback(lambda: timm.create_model(arch, pretrained=False, num_classes=10),
                             lambda: timm.create_model(arch, pretrained=False))
    import torchvision

    arch = name[len(TORCHVISION):] if name.startswith(TORCHVISION) else name
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise Skip(f"not a classification model in torchvision {torchvision.__version__}")
    return with_fallback(lambda: torchvision.models.get_model(arch, num_classes=10),
                         lambda: torchvision.models.get_model(arch))


def with_fallback(first: Callable[[], nn.Module], second: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """`first`, or `second` if `first` raises TypeError/ValueError (num_classes not accepted); Skip
    when neither builds."""
    def build() -> nn.Module:
        try:
            return first()
        except (TypeError, ValueError):
            try:
                return second()
            except Exception as exc:  # noqa: BLE001
                raise Skip(f"cannot be built: {type(exc).__name__}: {one_line(str(exc))}") from exc
    return build


def randomize_bn(model: nn.Module, seed: int) -> None:
    """A BN state like a sparsely trained model's, not init's (γ=1, β=0, mean 0, var 1): removed
    channels then carry nonzero β and the compensation has something to get right."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.05)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
            if m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            if m.running_var is not None:
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def runnable_sizes(model: nn.Module, sizes: list[int], seed: int) -> tuple[list[int], dict[int, str]]:
    """The sizes the unpruned model runs at with a finite output, and why not for the others
    (fixed-size models: ViT, MaxViT, 256-only attention nets; too-small inputs for deep stems)."""
    ok, why_not = [], {}
    for s in sizes:
        try:
            with torch.no_grad():
                out = as_tensor(model(torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed))))
        except Exception as exc:  # noqa: BLE001
            why_not[s] = f"{type(exc).__name__}: {one_line(str(exc))[:200]}"
            continue
        if not bool(torch.isfinite(out).all()):
            why_not[s] = "non-finite output with the random BN state"
            continue
        ok.append(s)
    return ok, why_not


def traceable_size(model: nn.Module, candidates: list[int], seed: int) -> int:
    """The first candidate size at which the model runs in eval mode and in train mode (slimctl
    traces in train mode, where auxiliary heads run: Inception-v3's needs about 299×299); Skip if none.
    A size that cannot be traced is this harness's choice, not a refusal by slimctl."""
    reasons = []
    for s in dict.fromkeys(candidates):
        work = copy.deepcopy(model)  # a train-mode forward updates the BN running statistics
        try:
            with torch.no_grad():
                for train in (False, True):
                    work.train(train)(torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(seed)))
            return s
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{s}: {type(exc).__name__}: {one_line(str(exc))[:120]}")
    raise Skip(f"no traceable input size ({'; '.join(reasons)})")


def zeroed_reference(pristine: nn.Module, removed: dict[str, torch.Tensor], *, zero_beta: bool) -> nn.Module:
    """What the pruned model must compute: the original with γ (and for `none` also β) zeroed at
    the removed channels, built here rather than by `slimctl.core.compensate.gamma_zeroed`."""
    ref = copy.deepcopy(pristine)
    with torch.no_grad():
        for bn_name, positions in removed.items():
            bn = ref.get_submodule(bn_name)
            bn.weight[positions.to(bn.weight.device)] = 0
            if zero_beta:
                bn.bias[positions.to(bn.bias.device)] = 0
    return ref.eval()


def as_tensor(output: Any) -> torch.Tensor:
    """The logits of a model that returns a tuple / namedtuple (GoogLeNet, Inception) or a tensor."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| / max|want|: scale-free, since random deep nets have outputs of any magnitude."""
    scale = float(want.abs().max())
    return float((got - want).abs().max()) / (scale if scale > 0 else 1.0)


def flops_pair(original: nn.Module, pruned: nn.Module, size: int) -> tuple[int | None, int | None]:
    """FLOPs before / after at the trace size; None if counting fails (it is a side measurement)."""
    try:
        return count_flops(original, (3, size, size)), count_flops(pruned, (3, size, size))
    except Exception:  # noqa: BLE001
        return None, None


def changed_entries(pristine: nn.Module, model: nn.Module) -> list[str]:
    """State entries prune_model changed in its input (inserted `select` buffers are allowed: the
    tracer adds identity selections in place)."""
    now = model.state_dict()
    return [k for k, v in pristine.state_dict().items() if k not in now or not torch.equal(now[k], v)]


def raised_at(exc: BaseException) -> str:
    """file:line (function) of the innermost slimctl frame of the traceback, else the innermost frame:
    where the library's developer should look."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    ours = [f for f in frames if f"{os.sep}slimctl{os.sep}" in f.filename]
    f = (ours or frames)[-1]
    path = f.filename.split(f"{os.sep}slimctl{os.sep}", 1)[-1] if ours else os.path.basename(f.filename)
    return f"{'slimctl/' if ours else ''}{path}:{f.lineno} ({f.name})"


def one_line(text: str) -> str:
    """Messages go into one table cell / JSON string: collapse newlines and runs of spaces."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- reporting


def progress_line(r: dict[str, Any]) -> str:
    """One line per model as it finishes, so a long background run can be followed in its log."""
    diffs = r.get("diffs", {})
    shown = "  ".join(f"{m} " + "/".join(f"{d:.1e}" for d in diffs[m].values()) for m in diffs)
    return f"{r['model']}: {r['status']} ({r.get('elapsed_s', 0):.0f} s) {shown} {r.get('reason', '')}".rstrip()


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per status, and the share of torchvision models with a BatchNorm that slimctl prunes
    (skipped models excluded: nothing is known of them)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tv_bn = [r for r in results if r["model"].startswith(TORCHVISION) and r.get("bns") and r["status"] != "skipped"]
    tv_pruned = [r for r in tv_bn if r.get("pruned")]
    return {"counts": counts, "torchvision_with_bn": len(tv_bn), "torchvision_with_bn_pruned": len(tv_pruned),
            "torchvision_with_bn_exact": sum(r["status"] == "exact" for r in tv_bn),
            "problems": [{"model": r["model"], "status": r["status"], "reason": r.get("reason", "")}
                         for r in results if r["status"] in ("failed", "error")],
            "skipped": [{"model": r["model"], "reason": r.get("reason", "")}
                        for r in results if r["status"] == "skipped"],
            "library_disagrees": library_disagreements(results)}


def library_disagreements(results: list[dict[str, Any]]) -> list[str]:
    """model/mode where prune_model's own exactness verdict (its third return value, when it has one)
    differs from this check's: the library measures at its one probe size, this check at --sizes."""
    found = []
    for r in results:
        for mode, says in (r.get("library_says_exact") or {}).items():
            ours = all(d < TOLERANCE for d in r.get("diffs", {}).get(mode, {}).values())
            if says is not None and mode in r.get("diffs", {}) and bool(says) != ours:
                found.append(f"{r['model']} {mode}: library says {'exact' if says else 'not exact'}, "
                             f"this check {'exact' if ours else 'not exact'}")
    return found


def summary_line(summary: dict[str, Any], elapsed: float) -> str:
    """The last line of the output: counts per status and the torchvision coverage."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items()))
    line = f"{sum(summary['counts'].values())} models in {elapsed:.0f} s: {counts}"
    if summary["torchvision_with_bn"]:
        n, pruned, exact = (summary["torchvision_with_bn"], summary["torchvision_with_bn_pruned"],
                            summary["torchvision_with_bn_exact"])
        line += (f"; torchvision classification models with a BatchNorm: {100 * pruned / n:.0f}% prune rather "
                 f"than being refused ({pruned}/{n}), {100 * exact / n:.0f}% exact ({exact}/{n})")
    if summary["library_disagrees"]:
        line += f"; prune_model's own verdict disagrees for: {'; '.join(summary['library_disagrees'])}"
    return line


def diff_cell(diffs: dict[str, float], sizes: list[int]) -> str:
    """1.2e-07/3.4e-07, prefixed by the sizes when the model ran at other sizes than --sizes."""
    values = "/".join(f"{d:.1e}" for d in diffs.values())
    return values if list(diffs) == [str(s) for s in sizes] else f"@{'/'.join(diffs)}: {values}"


def markdown_table(results: list[dict[str, Any]], sizes: list[int], ratio: float) -> str:
    """model | status | exact rel. diff | none rel. diff | params left | reason, one row per model."""
    size_label = "/".join(str(s) for s in sizes)
    lines = [f"Prune ratio {ratio}, random weights and BN state, float32, eval; rel. diff at {size_label} px "
             f"(exact below {TOLERANCE:g}).", "",
             f"| model | status | exact rel. diff ({size_label}) | none rel. diff ({size_label}) "
             "| params left | reason |",
             "|---|---|---|---|---|---|"]
    for r in results:
        diffs = r.get("diffs", {})
        cells = [diff_cell(diffs[m], sizes) if m in diffs else "" for m in MODES]
        left = (f"{100 * r['params_pruned'] / r['params']:.0f}% of {r['params'] / 1e6:.1f}M"
                if r.get("params_pruned") and r.get("params") else "")
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['status']} | {cells[0]} | {cells[1]} | {left} | {reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
