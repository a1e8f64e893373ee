"""The polarization regularizer (train.regularizer: polarization): its gradient, its fused step, AMP,
resume, the held-out validation split it is tuned on, and prune --ratio auto at its gap."""

import json

import pytest
import torch
from torch import nn

from conftest import DEMO_CONFIG, TINY, run, sets
from slimctl.core.plan import GAP_FACTOR, gap_cut
from slimctl.core.sparsity import SparsityTerm, bn_scales, polarization_grad
from slimctl.data import build_loaders
from slimctl.errors import SlimctlError
from slimctl.io.checkpoint import load_checkpoint
from slimctl.io.config import load_config
from slimctl.models import create_model
from slimctl.trace import channel_groups
from slimctl.train import TrainStep, train_one_epoch


def polarization(flat: torch.Tensor, t: float) -> torch.Tensor:
    """R(γ) = t·Σ|γ| − Σ|γ − mean γ|, written out (the reference for the fused gradient)."""
    return t * flat.abs().sum() - (flat - flat.mean()).abs().sum()


def test_the_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    gammas = [torch.rand(n, generator=gen, dtype=torch.float64) for n in (5, 9, 4)]
    t, eps = 1.3, 1e-7  # far below the distance of any γ from 0 or from the mean: R is linear there
    flat = torch.cat(gammas)
    numeric = torch.stack([
        (polarization(flat + eps * e, t) - polarization(flat - eps * e, t)) / (2 * eps)
        for e in torch.eye(flat.numel(), dtype=torch.float64)
    ])
    fused = torch.cat(polarization_grad(gammas, t))
    assert torch.allclose(fused, numeric, atol=1e-6)
    assert [g.numel() for g in polarization_grad(gammas, t)] == [5, 9, 4]  # split back per BN


def _model_and_gammas(seed=0):
    torch.manual_seed(seed)
    model = create_model("vgg11", 10, width=0.125)
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    with torch.no_grad():
        for g in gammas:
            g.uniform_(-0.2, 1.2)  # some below 0 and above the bound: the clamp must act
    return model, gammas


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_fused_step_matches_an_unfused_reference(momentum):
    lam, t, bound = 1e-2, 1.2, 1.0
    x, y = _batch()
    model, gammas = _model_and_gammas()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4)
    step = TrainStep(model, opt, gammas=gammas, sparsity=SparsityTerm(lam, "polarization", t, bound),
                     device=torch.device("cpu"), dtype=None)
    # The reference: λ·R added to the loss and differentiated by autograd, then SGD, then the clamp.
    ref, ref_gammas = _model_and_gammas()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4)
    for _ in range(3):  # momentum carries the term from step to step
        train_one_epoch(step, [(x, y)])
        ref.train()
        loss = nn.functional.cross_entropy(ref(x), y) + lam * polarization(torch.cat(list(ref_gammas)), t)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        with torch.no_grad():
            for g in ref_gammas:
                g.clamp_(0, bound)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    flat = torch.cat([g.detach() for g in gammas])
    assert float(flat.min()) == 0.0 and float(flat.max()) == bound  # clamped into [0, bound]


def test_the_update_is_the_same_with_a_grad_scaler():
    # The term must meet unscaled gradients: added before unscaling it would be divided by 2^10.
    x, y = _batch()
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model, gammas = _model_and_gammas()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_one_epoch(TrainStep(model, opt, gammas=gammas, sparsity=SparsityTerm(1e-2, "polarization", 1.2),
                                  device=torch.device("cpu"), dtype=None, scaler=scaler), [(x, y)])
        results.append(torch.cat([g.detach().clone() for g in gammas]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_l1_and_no_term_never_clamp():
    for term in (SparsityTerm(1e-2, "l1"), SparsityTerm(0.0, "polarization")):
        model, gammas = _model_and_gammas()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        train_one_epoch(TrainStep(model, opt, gammas=gammas, sparsity=term, device=torch.device("cpu"),
                                  dtype=None), [_batch()])
        flat = torch.cat([g.detach() for g in gammas])
        assert float(flat.min()) < 0 and float(flat.max()) > 1


def test_bad_parameters_are_exit_2_in_one_line(tmp_path):
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "r",
                 *sets(*TINY, "train.regularizer=polarization", "train.polarization_t=-1"), code=2)
    assert result.output.strip().count("\n") == 0 and "polarization_t" in result.output
    assert not (tmp_path / "r").exists()


def test_finetune_drops_the_regularizer():
    cfg = load_config(None, ["train.regularizer=polarization", "train.polarization_t=1.4", "train.gamma_bound=2"])
    ft = cfg.finetune_train()
    assert (ft.regularizer, ft.polarization_t, ft.gamma_bound, ft.sparsity) == ("l1", 1.0, 1.0, 0.0)


# --- the held-out split ------------------------------------------------------------------------------


def test_holdout_is_a_seeded_disjoint_split_of_the_training_set():
    def loaders(holdout, seed=0):
        cfg = load_config(None, ["data.name=digits", f"data.holdout={holdout}", f"data.seed={seed}"]).data
        return build_loaders(cfg, device="cpu")

    full, _, _ = loaders("null")
    train, held, _ = loaders(300)
    assert (train.dataset_size, held.dataset_size) == (full.dataset_size - 300, 300)

    def rows(loader):
        return {bytes(img.numpy().tobytes()) for img in loader.images}

    assert not rows(train) & rows(held) and rows(train) | rows(held) == rows(full)
    assert rows(loaders(300)[1]) == rows(held) and rows(loaders(300, seed=1)[1]) != rows(held)
    with pytest.raises(SlimctlError, match="leaves no training images"):
        loaders(full.dataset_size)
    with pytest.raises(SlimctlError, match="data.holdout"):
        load_config(None, ["data.name=imagefolder", "data.holdout=10"])


# --- a polarized run: resume, ratio auto ---------------------------------------------------------------

POLAR = sets(*TINY, "data.subset=480", "train.epochs=3", "train.regularizer=polarization",
             "train.polarization_t=1.4", "train.sparsity_budget=null", "train.sparsity=0.1", "data.holdout=200")


@pytest.fixture(scope="module")
def polarized(tmp_path_factory):
    out = tmp_path_factory.mktemp("polar") / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *POLAR)
    assert "polarization t=1.4, γ in [0, 1]" in result.output and "200 held-out images" in result.output
    return out


def test_a_polarized_run_resumes_bit_identically(tmp_path, monkeypatch, polarized):
    import slimctl.train.loop as loop

    real_evaluate, calls = loop.evaluate, {"n": 0}

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit(137)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", crash_in_epoch_two)
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "r", *POLAR, code=137)
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "r", *POLAR, "--resume")
    resumed, reference = load_checkpoint(tmp_path / "r" / "last.pt"), load_checkpoint(polarized / "last.pt")
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert resumed["config"]["train"]["regularizer"] == "polarization"


def test_prune_ratio_auto_cuts_a_polarized_model_at_its_gap(tmp_path, polarized):
    ckpt = load_checkpoint(polarized / "best.pt")
    gammas = torch.cat([v.abs().flatten() for k, v in ckpt["state_dict"].items()
                        if k.endswith(".weight") and v.ndim == 1 and "classifier" not in k])
    assert float(gammas.min()) == 0.0  # polarization sent some γ exactly to 0 (the clamp)
    result = json.loads(run("prune", polarized / "best.pt", "--ratio", "auto", "-o", tmp_path / "p.pt",
                            "--json").output)
    cut = result["auto_cut"]
    assert cut["below"] < cut["above"] / GAP_FACTOR and result["ratio"] == cut["ratio"]
    assert result["threshold"] == cut["below"]
    assert result["channels_kept"] == cut["total"] - cut["removed"]  # exactly the channels above the gap
    assert result["top1"] == pytest.approx(result["top1_before"], abs=0.6)  # what sat at 0 carried nothing
    assert load_checkpoint(tmp_path / "p.pt")["prune"]["auto_cut"] == cut


def test_ratio_auto_is_refused_without_a_gap(tiny_run, tmp_path):
    result = run("prune", tiny_run / "best.pt", "--ratio", "auto", "-o", tmp_path / "p.pt", code=2)
    assert "no clear gap" in result.output and result.output.strip().count("\n") == 0
    assert not (tmp_path / "p.pt").exists()
    both = run("prune", tiny_run / "best.pt", "--ratio", "auto", "--target-flops", "0.5", code=2).output
    assert "not both" in both  # the pair is refused before any gap is looked for
    bad = run("prune", tiny_run / "best.pt", "--ratio", "half", code=2).output
    assert "is not a valid ratio: give a number in [0, 1) or auto" in bad


def test_gap_cut_on_known_distributions():
    scores = torch.tensor([0.0, 0.0, 1e-4, 2e-4, 0.3, 0.5, 0.9, 1.0])
    cut = gap_cut(scores)
    assert (cut.removed, cut.below, cut.above) == (4, pytest.approx(2e-4), pytest.approx(0.3))
    assert int(cut.ratio * 8) == 3  # global_threshold's index: the largest removed |γ|
    # Zeros and the smallest non-zero |γ| below the floor make no gap of their own.
    assert gap_cut(torch.tensor([0.0, 1e-9, 0.4, 0.5])).removed == 2
    with pytest.raises(SlimctlError, match="no clear gap"):
        gap_cut(torch.linspace(0.05, 1.0, 50))
    with pytest.raises(SlimctlError, match="no clear gap"):
        gap_cut(torch.zeros(10))
    with pytest.raises(SlimctlError, match="no clear gap"):  # one large |γ| on top is no place to cut
        gap_cut(torch.cat([torch.linspace(0.05, 1.0, 50), torch.tensor([12.0])]))


def test_finetuning_holds_out_what_its_parent_held_out(polarized, tmp_path):
    run("prune", polarized / "best.pt", "--ratio", "0.3", "-o", tmp_path / "p.pt", "--no-eval", "--no-speed-check")
    for other in (["data.holdout=100"], ["data.holdout=null"], ["data.seed=1"]):
        result = run("finetune", tmp_path / "p.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "ft",
                     *sets(*TINY, "data.holdout=200", *other), code=2)
        assert "would leak into training" in result.output and not (tmp_path / "ft").exists()
