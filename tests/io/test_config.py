import pytest

from conftest import ROOT
from slimctl.io.config import Config, load_config
from slimctl.errors import SlimctlError
from slimctl.pipeline.inspection import check_names
from slimctl.train import lr_at, milestone_epochs


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.data.batch_size, cfg.data.test_batch_size, cfg.train.epochs) == (64, 256, 160)
    assert cfg.train.milestones == (0.5, 0.75)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_overrides_are_yaml_typed_and_applied_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  lr: 0.05\n")
    cfg = load_config(path, ["train.epochs=7", "data.subset=100", "train.milestones=[0.3, 0.6]", "data.download=true"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.05
    assert cfg.data.subset == 100 and cfg.data.download is True
    assert cfg.train.milestones == (0.3, 0.6)


def test_int_accepted_for_float():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_finetune_inherits_unset_keys_and_never_sparsifies():
    cfg = load_config(None, ["train.sparsity=1e-4", "train.lr=0.05", "finetune.epochs=3"])
    ft = cfg.finetune_train()
    assert ft.epochs == 3 and ft.lr == 0.05 and ft.sparsity == 0.0
    with pytest.raises(SlimctlError, match="finetune.sparsity"):
        load_config(None, ["finetune.sparsity=1e-4"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("trian.epochs=3", "unknown config key 'trian'; did you mean 'train'"),
        ("train.epochs=three", "'train.epochs' must be int"),
        ("train.epochs=2.5", "'train.epochs' must be int"),
        ("data.download=yes please", "'data.download' must be bool"),
        ("train.lr=0", "'train.lr' must be in (0, 1e+30]"),
        ("train.epochs=0", "'train.epochs' must be in [1, 1,000,000]"),
        ("prune.ratio=1.0", "must be in [0, 1)"),
        ("train.sparsity=-1", "'train.sparsity' must be in [0, 1e+30]"),
        ("train.milestones=[0.5, 1.5]", "'train.milestones' must be fractions in (0, 1]"),
        ("train.device=tpu", "'train.device' must be one of auto, cpu, cuda"),
        ("data.batch_size=0", "'data.batch_size' must be >= 1"),
        ("train=3", "'train' must be a section"),
        ("noequals", "--set expects key=value"),
        # Numbers beyond any recipe are refused before anything runs.
        ("train.epochs=1000000000000", "'train.epochs' must be in [1, 1,000,000]"),
        ("train.lr=1e300", "'train.lr' must be in (0, 1e+30]"),
        ("finetune.lr=1e300", "'finetune.lr' must be in (0, 1e+30]"),
        ("train.sparsity_budget=1e300", "'train.sparsity_budget' must be in [0, 1e+06] or null"),
        # The polarization regularizer's parameters.
        ("train.regularizer=l2", "'train.regularizer' must be l1 or polarization"),
        ("train.polarization_t=0", "'train.polarization_t' must be in (0, 1000]"),
        ("train.polarization_t=.nan", "'train.polarization_t' must be a finite number"),
        ("train.gamma_bound=-1", "'train.gamma_bound' must be in (0, 1e+06]"),
        ("train.polarization_t=1.2", "apply only with train.regularizer: polarization"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(SlimctlError) as info:
        load_config(None, [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override, message", [("model.arch=vgg99", "'model.arch' must be one of"),
                                               ("data.name=mnist", "'data.name' must be one of")])
def test_unknown_names_are_checked_against_their_registries(override, message):
    cfg = load_config(None, [override])  # types and ranges are fine: the name is the stage's to check
    with pytest.raises(SlimctlError, match=message):
        check_names(cfg)


def test_bad_files(tmp_path):
    with pytest.raises(SlimctlError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SlimctlError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(SlimctlError, match="expected a mapping"):
        load_config(scalar)


def test_milestones_are_integer_epochs():
    # The reference compared floats, so 0.75·5 = 3.75 never matched an epoch; here it is epoch 3.
    assert milestone_epochs((0.5, 0.75), 160) == [80, 120]
    assert milestone_epochs((0.5, 0.75), 5) == [2, 3]
    assert milestone_epochs((0.5,), 1) == [1]
    lrs = [lr_at(e, lr=0.1, milestones=[2, 3], decay=0.1) for e in range(5)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])


def test_scientific_notation_without_dot_is_a_float():
    # YAML 1.1 would read these as strings; users write them anyway.
    assert load_config(None, ["train.sparsity=1e-4"]).train.sparsity == 1e-4
    assert load_config(None, ["train.weight_decay=5E-4"]).train.weight_decay == 5e-4
    with pytest.raises(SlimctlError, match="finite"):
        load_config(None, ["train.lr=.inf"])


def test_the_lr_sum_is_the_sum_over_every_step_in_closed_form():
    import random

    from slimctl.train.schedule import lr_at, lr_sum, milestone_epochs

    rng = random.Random(0)
    for _ in range(300):
        epochs, decay, steps = rng.randint(1, 40), rng.choice([0.1, 0.5, 1.0]), rng.randint(1, 9)
        milestones = milestone_epochs([rng.random() for _ in range(rng.randint(0, 3))], epochs)
        looped = steps * sum(lr_at(e, lr=0.1, milestones=milestones, decay=decay) for e in range(epochs))
        assert lr_sum(lr=0.1, milestones=milestones, decay=decay, epochs=epochs,
                      steps_per_epoch=steps) == pytest.approx(looped, rel=1e-12)
    assert lr_sum(lr=0.1, milestones=[10**11], decay=0.1, epochs=10**12, steps_per_epoch=10) == pytest.approx(
        10 * 0.1 * 10**11 + 10 * 0.01 * 9 * 10**11)  # a trillion epochs, at once


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "model: *i\n"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(SlimctlError) as caught:
        load_config(path)
    assert "YAML aliases" in str(caught.value) and len(str(caught.value)) < 300
    with pytest.raises(SlimctlError, match="YAML aliases"):
        load_config(None, ["model.args=" + BOMB.replace("\n", ", ").join("{}")])
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(SlimctlError, match="a config is at most"):
        load_config(big)


def test_an_error_never_echoes_a_whole_value():
    with pytest.raises(SlimctlError) as caught:
        load_config(None, ["train.lr=" + "x" * 5000])
    assert len(str(caught.value)) < 300 and "(5,002 characters)" in str(caught.value)
    with pytest.raises(SlimctlError, match="a number too long to read"):
        load_config(None, ["train.lr=" + "9" * 5000])
