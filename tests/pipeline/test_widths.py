"""prune --round-to auto: per-layer channel counts chosen by timing their operators, cached."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimctl
from conftest import grouped_bottleneck, run, use_clock
from slimctl.pipeline import latency, opclock, widths
from slimctl.pipeline.widths import candidates


def test_candidates_are_gammas_count_and_multiples_a_little_above_it():
    assert candidates(13, 64) == [13, 14, 16]
    assert candidates(100, 256) == [100, 104, 112]  # up to 12.5% more (128 is beyond)
    assert candidates(61, 62) == [61, 62] and candidates(60, 62) == [60]  # never more than the layer has
    assert candidates(1, 1) == [1] and all(c >= 13 for c in candidates(13, 64))



@pytest.fixture
def eights_are_fast(monkeypatch, tmp_path):
    """A noiseless operator clock: cost ∝ the multiply-adds, halved when every width is a multiple of 8;
    the cache goes to tmp_path. Returns the list of shapes it timed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    timed = []

    def clock(spec, *, batch_size, precision):
        timed.append(spec)
        if spec[0] == "linear":
            return spec[1] * spec[2] * 1e-6
        _, c_in, c_out, kh, kw, *_, groups, height, width = spec
        cost = c_in // groups * c_out * kh * kw * height * width * 1e-6
        return cost / 2 if c_in % 8 == 0 and c_out % 8 == 0 else cost

    monkeypatch.setattr(opclock, "time_op", clock)
    use_clock(monkeypatch, odd_widths_clock)  # the whole model, as confirm times it
    return timed


def odd_widths_clock(model, target):
    """The whole model on the same terms, as deployed (BNs folded, compensation carried by constant
    channels): each convolution width that is not a multiple of 8 costs 1 ms."""
    return float(sum((m.in_channels % 8 != 0) + (m.out_channels % 8 != 0)
                     for m in slimctl.fold_bn(model).modules() if isinstance(m, nn.Conv2d)))


def deployed_widths(path):
    """The output widths of every convolution of a pruned checkpoint's model as deployed."""
    return [m.out_channels for m in slimctl.fold_bn(slimctl.load_model(path)).modules() if isinstance(m, nn.Conv2d)]


def _prune(checkpoint, out, *extra):
    return json.loads(run("prune", checkpoint, "--ratio", "0.5", "-o", out, "--no-eval", "--no-speed-check",
                          "--json", *extra).output)


def test_auto_keeps_the_faster_count_and_the_next_highest_gamma(sparse_checkpoint, tmp_path, eights_are_fast):
    plain = _prune(sparse_checkpoint, tmp_path / "plain.pt")
    auto = _prune(sparse_checkpoint, tmp_path / "auto.pt", "--round-to", "auto")
    record = auto["widths"]
    assert record["changed"] and auto["round_to"] == "auto"
    # γ's counts, the per-layer choice and the uniform multiples were each timed as a whole; the fastest won.
    assert {"γ's counts", "per layer", "multiples of 16"} <= set(record["candidates"])
    assert record["chosen"] == min(record["candidates"], key=record["candidates"].get) != "γ's counts"
    assert record["candidates"][record["chosen"]] < record["candidates"]["γ's counts"]
    by_name = {layer["name"]: layer for layer in plain["layers"]}
    for change in record["changed"]:
        gamma = by_name[change["name"]]["kept"]
        assert change["gamma"] == gamma < change["chosen"] <= by_name[change["name"]]["total"]
        if record["chosen"] == "per layer":
            assert change["ms_chosen"] < change["ms_gamma"]
    for layer in auto["layers"]:  # never fewer than γ chose
        assert layer["kept"] >= by_name[layer["name"]]["kept"]
    # The extra channels are the next-highest |γ|: every channel γ kept is still kept.
    model = slimctl.load_model(sparse_checkpoint)
    gamma_plan = slimctl.make_plan(model, slimctl.channel_groups(model), 0.5)
    auto_keep = {gp.group.bn: set(gp.keep.tolist()) for gp in _auto_plan(model, tmp_path).groups}
    for gp in gamma_plan.groups:
        kept = set(gp.keep.tolist())
        assert kept <= auto_keep[gp.group.bn]
        extra = auto_keep[gp.group.bn] - kept
        if extra:
            scores = slimctl.group_scores(model, gp.group)
            dropped = set(range(gp.total)) - auto_keep[gp.group.bn]
            assert min(scores[i] for i in extra) >= max((scores[i] for i in dropped), default=0)
    assert auto["exactness"]["max_rel_diff"] < 1e-4  # the pruned model still computes the γ-zeroed original


def test_under_onnxruntime_the_whole_models_decide_without_operator_timing(sparse_checkpoint, tmp_path,
                                                                           eights_are_fast, monkeypatch):
    monkeypatch.setattr(opclock, "time_op", lambda *a, **k: pytest.fail("timed a torch operator for onnxruntime"))
    seen = []
    use_clock(monkeypatch, lambda model, target: seen.append(target) or
                        odd_widths_clock(model, target))
    auto = _prune(sparse_checkpoint, tmp_path / "auto.pt", "--round-to", "auto", "--runtime", "onnxruntime",
                  "--latency-batch", "4")
    assert "per layer" not in auto["widths"]["candidates"] and auto["widths"]["chosen"] == "multiples of 8"
    assert all(width % 8 == 0 for width in deployed_widths(tmp_path / "auto.pt"))
    # The constant channel that carries a padded consumer's compensation counts: those groups keep 8k − 1.
    assert any(layer["kept"] % 8 == 7 for layer in auto["layers"])
    assert {(t.runtime, t.batch_size) for t in seen} == {("onnxruntime", 4)}


def test_counts_faster_op_by_op_but_not_as_a_whole_are_reverted(sparse_checkpoint, tmp_path, eights_are_fast,
                                                               monkeypatch):
    use_clock(monkeypatch, lambda model, target: slimctl.count_flops(model) / 1e6)
    plain = _prune(sparse_checkpoint, tmp_path / "plain.pt")
    auto = _prune(sparse_checkpoint, tmp_path / "auto.pt", "--round-to", "auto")
    assert auto["widths"]["chosen"] == "γ's counts" and auto["widths"]["changed"] == []
    assert len(auto["widths"]["candidates"]) >= 3 and auto["layers"] == plain["layers"]
    shown = run("prune", sparse_checkpoint, "--ratio", "0.5", "-o", tmp_path / "shown.pt", "--no-eval",
                "--no-speed-check", "--round-to", "auto").output
    assert "--round-to auto: γ's counts; timed as whole models: γ's counts" in " ".join(shown.split())


def _auto_plan(model, tmp_path):
    from slimctl.pipeline.latency import LatencyTarget, conditions

    plan = slimctl.make_plan(model, slimctl.channel_groups(model), 0.5)
    return widths.measured_widths(model, plan, opclock.OpClock(conditions(LatencyTarget("t", fraction=1.0))))[0]


def test_timings_are_cached_per_conditions(sparse_checkpoint, tmp_path, eights_are_fast, monkeypatch):
    first = _prune(sparse_checkpoint, tmp_path / "a.pt", "--round-to", "auto")
    assert first["widths"]["timed"] == len(set(eights_are_fast)) > 0
    stored = json.loads((tmp_path / "cache" / "slimctl" / "op_latency.json").read_text())
    [key] = stored
    assert "batch 1" in key and "fp32" in key and "threads" in key
    monkeypatch.setattr(opclock, "time_op", lambda *a, **k: pytest.fail("timed a shape the cache holds"))
    second = _prune(sparse_checkpoint, tmp_path / "b.pt", "--round-to", "auto")
    assert second["widths"]["timed"] == 0 and second["layers"] == first["layers"]


def test_a_clock_without_a_preference_changes_nothing(sparse_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(opclock, "time_op", lambda spec, **k: float(spec[1] * spec[2]))  # more channels: slower
    use_clock(monkeypatch, lambda model, target: slimctl.count_flops(model) / 1e6)
    plain = _prune(sparse_checkpoint, tmp_path / "plain.pt")
    auto = _prune(sparse_checkpoint, tmp_path / "auto.pt", "--round-to", "auto")
    assert auto["widths"]["changed"] == [] and auto["layers"] == plain["layers"]


def test_a_bad_round_to_is_exit_2(sparse_checkpoint, tmp_path):
    result = run("prune", sparse_checkpoint, "--round-to", "fast", "-o", tmp_path / "p.pt", code=2)
    assert "fast" in result.output and not (tmp_path / "p.pt").exists()


def test_grouped_convolutions_get_counts_their_groups_divide(tmp_path, monkeypatch):
    from slimctl.pipeline.latency import LatencyTarget, conditions

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(opclock, "time_op", lambda spec, **k: 1.0 if spec[2] % 8 else 0.5)  # 8s look fast
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 24, 3, padding=1, groups=3), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    model.arch_spec = {"arch": None, "num_classes": 10, "arch_args": {}, "input_size": [3, 16, 16]}
    plan = slimctl.make_plan(model, slimctl.channel_groups(model), 0.4)
    chosen, _ = widths.measured_widths(model, plan, opclock.OpClock(conditions(LatencyTarget("t", fraction=1.0))))
    for gp in chosen.groups:  # every count runs: a multiple of the grouped conv's 3 groups
        assert gp.kept % 3 == 0
    slimctl.apply_plan(model, chosen)(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "negative", "nan", "not json"])
def test_a_corrupt_cache_is_timed_afresh(tmp_path, monkeypatch, content):
    from slimctl.pipeline.latency import LatencyTarget, conditions

    cache = tmp_path / "slimctl" / "op_latency.json"
    cache.parent.mkdir()
    now = conditions(LatencyTarget("t", fraction=1.0))
    prefix = opclock.OpClock(now, path=cache).key_prefix()
    if content in ("negative", "nan"):  # well-formed, but a cost no operator has
        content = json.dumps({prefix: {"linear,4,4": -1.0 if content == "negative" else float("nan")}})
    cache.write_text(content)
    clock = opclock.OpClock(now, path=cache)
    assert clock.entries == {}
    monkeypatch.setattr(opclock, "time_op", lambda spec, **k: 2.0)
    assert clock.ms(("linear", 4, 4)) == 2.0 and clock.timed == 1
    clock.save()
    assert opclock.OpClock(clock.conditions, path=cache).entries == {"linear,4,4": 2.0}


def test_a_target_with_a_widening_option_is_refused(sparse_checkpoint, tmp_path):
    result = run("prune", sparse_checkpoint, "--target-flops", "0.5", "--keep-gathers", "-o", tmp_path / "p.pt", code=2)
    assert "use one or the other" in result.output and not (tmp_path / "p.pt").exists()


def test_auto_beside_a_latency_target_keeps_the_widest_cut_that_meets_it(sparse_checkpoint, tmp_path, monkeypatch):
    full = slimctl.count_flops(slimctl.load_model(sparse_checkpoint)) / 1e6

    def odd_widths_cost(model, target):  # FLOPs / 1e6 ms, and 5% of the original's for every width not a multiple of 8
        return slimctl.count_flops(model) / 1e6 + 0.05 * full * odd_widths_clock(model, target)

    use_clock(monkeypatch, odd_widths_cost)
    plain = json.loads(run("prune", sparse_checkpoint, "--target-latency", "0.8", "-o", tmp_path / "p.pt",
                           "--no-eval", "--json").output)
    auto = json.loads(run("prune", sparse_checkpoint, "--target-latency", "0.8", "--round-to", "auto", "-o",
                          tmp_path / "a.pt", "--no-eval", "--json").output)
    kept = auto["widths"]["kept"]
    assert auto["widths"]["chosen"] == max(kept, key=kept.get) != "γ's counts"
    assert kept["γ's counts"] == plain["channels_kept"] < auto["channels_kept"] == kept[auto["widths"]["chosen"]]
    assert auto["latency"]["met"] and auto["latency"]["pruned_ms"] <= 0.8 * auto["latency"]["unpruned_ms"]


def test_auto_beside_a_flops_target_keeps_the_fastest_multiple_that_meets_it(sparse_checkpoint, tmp_path,
                                                                            eights_are_fast):
    plain = _prune_to(sparse_checkpoint, tmp_path / "plain.pt")
    auto = _prune_to(sparse_checkpoint, tmp_path / "auto.pt", "--round-to", "auto")
    record = auto["widths"]
    assert record["chosen"] == min(record["candidates"], key=record["candidates"].get) != "γ's counts"
    assert {"γ's counts", "multiples of 8"} <= set(record["candidates"])
    q = int(record["chosen"].split()[-1])
    assert all(width % q == 0 for width in deployed_widths(tmp_path / "auto.pt"))
    for result in (plain, auto):  # each meets the target: at least 40% of the FLOPs gone
        assert result["flops"] <= 0.6 * result["flops_before"]


def _prune_to(checkpoint, out, *extra):
    return json.loads(run("prune", checkpoint, "--target-flops", "0.4", "-o", out, "--no-eval", "--no-speed-check",
                          "--json", *extra).output)


def test_a_fixed_multiple_holds_as_deployed_and_never_keeps_fewer_than_gamma(sparse_checkpoint, tmp_path):
    """Folding carries a padded consumer's compensation in one more channel (8k → 8k + 1): `--round-to
    8` keeps one channel fewer there (or 7 more, never below γ's count), with a ratio or a target."""
    plain = _prune(sparse_checkpoint, tmp_path / "plain.pt")
    eights = _prune(sparse_checkpoint, tmp_path / "r8.pt", "--round-to", "8")
    assert all(width % 8 == 0 for width in deployed_widths(tmp_path / "r8.pt"))
    assert any(width % 8 for width in deployed_widths(tmp_path / "plain.pt"))
    gamma = {row["name"]: row["kept"] for row in plain["layers"]}
    assert all(row["kept"] >= gamma[row["name"]] for row in eights["layers"])
    target = _prune_to(sparse_checkpoint, tmp_path / "t8.pt", "--round-to", "8")
    assert target["flops"] <= 0.6 * target["flops_before"]
    assert all(width % 8 == 0 for width in deployed_widths(tmp_path / "t8.pt"))


def test_timings_cached_before_memory_was_kept_while_timing_are_not_reused(tmp_path):
    from slimctl.pipeline.latency import LatencyTarget, conditions

    cache = tmp_path / "op_latency.json"
    now = conditions(LatencyTarget("t", fraction=1.0))
    prefix = opclock.OpClock(now, path=cache).key_prefix()
    assert prefix.endswith("|" + opclock.TIMING)
    cache.write_text(json.dumps({prefix.removesuffix("|" + opclock.TIMING): {"linear,4,4": 2.0},
                                 prefix: {"linear,8,8": 3.0}}))
    assert opclock.OpClock(now, path=cache).entries == {"linear,8,8": 3.0}


def narrow_groups_clock(model, target):
    """A kernel library that runs narrow groups poorly: 10 ms for each grouped conv with fewer than 3
    channels a group, plus 0.01 ms a channel of every conv."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(10.0 * (1 < m.groups < m.in_channels and m.in_channels // m.groups < 3) + 0.01 * m.out_channels
               for m in convs)


@pytest.fixture
def bottleneck(monkeypatch, tmp_path):
    """ResNeXt's block (4 groups of 3) with random γ, operators all alike, whole models on the clock above."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(opclock, "time_op", lambda spec, **k: 1.0)  # no per-layer preference
    use_clock(monkeypatch, narrow_groups_clock)
    return grouped_bottleneck().float()


def test_auto_times_whole_groups_and_keeps_them_when_faster(bottleneck):
    plan = slimctl.make_plan(bottleneck, slimctl.channel_groups(bottleneck), 0.5)
    chosen, record = widths.auto_widths(bottleneck, plan, compensate="exact")
    assert record["chosen"] == "whole groups" and "γ's counts" in record["candidates"]
    pruned = slimctl.apply_plan(bottleneck, chosen)
    assert pruned.b.groups < 4 and pruned.b.in_channels // pruned.b.groups == 3


def test_auto_beside_a_flops_target_searches_whole_groups_at_the_target(bottleneck):
    from slimctl.core.targets import measure, parse_target, plan_for_target

    groups, target = slimctl.channel_groups(bottleneck), parse_target("flops", "0.3")
    plan, _ = plan_for_target(bottleneck, groups, target, min_channels=1, round_to=1)
    chosen, record = widths.target_widths(bottleneck, groups, target, plan, min_channels=1, compensate="exact")
    assert record["chosen"] == "whole groups"
    pruned = slimctl.apply_plan(bottleneck, chosen)
    assert pruned.b.groups < 4 and measure(pruned, "flops") <= 0.7 * measure(bottleneck, "flops")


def test_prune_says_how_many_layers_whole_groups_made_wider_and_narrower(bottleneck, tmp_path):
    slimctl.save_model(bottleneck, tmp_path / "s.pt", args={}, stage="sparse-train")
    result = _prune(tmp_path / "s.pt", tmp_path / "p.pt", "--round-to", "auto")
    widths_record = result["widths"]
    assert widths_record["chosen"] == "whole groups"
    wider = sum(c["chosen"] > c["gamma"] for c in widths_record["changed"])
    narrower = sum(c["chosen"] < c["gamma"] for c in widths_record["changed"])
    text = run("prune", tmp_path / "s.pt", "--ratio", "0.5", "--round-to", "auto", "-o", tmp_path / "q.pt",
               "--no-eval", "--no-speed-check").output
    assert f"--round-to auto: whole groups ({wider} layers wider" in text
    assert (f", {narrower} narrower than γ chose)" in text) == (narrower > 0)
