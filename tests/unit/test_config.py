"""The typed config tree: recipes, inheritance, overrides, errors naming the key."""

from pathlib import Path

import pytest

from system.config import ConfigError, from_dict, load_config, to_dict
from system.run_config import RunConfig

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    from launch.train import load  # as parsimony-train reads a recipe (its launch: section set aside)

    cfg = load(str(path), [])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # the typed tree round-trips: what a job ships is the recipe


def test_fmnist_recipes_share_the_base_and_differ_only_in_method():
    dicts = {p.stem: to_dict(load_config(RunConfig, p)) for p in CONFIGS if p.stem.startswith("fmnist_resnet20_")}
    assert len(dicts) == 6
    for d in dicts.values():
        for section in ("data", "optim", "train", "model"):
            assert d[section] == dicts["fmnist_resnet20_dense"][section]
    assert dicts["fmnist_resnet20_unit_only"]["method"]["variational"]["layer_gates"] is False
    assert dicts["fmnist_resnet20_layer_only"]["method"]["variational"]["unit_gates"] is False
    # the combined method's recipe is the method's validated defaults (it kept unvalidated nu 1 / alpha 0.5 until
    # session 24); the ablations differ from them only in what names them
    default = to_dict(RunConfig())["method"]["variational"]
    variational = {k: d["method"]["variational"] for k, d in dicts.items() if d["method"]["name"] == "variational"}
    assert variational["fmnist_resnet20_variational"] == default
    for name, differs in (("fmnist_resnet20_unit_only", {"layer_gates", "alpha"}),
                          ("fmnist_resnet20_layer_only", {"unit_gates"})):
        assert {k for k, v in variational[name].items() if v != default[k]} == differs, name


def test_overrides_apply_in_order_and_are_typed(tmp_path):
    cfg = load_config(RunConfig, "configs/demo.yaml", ["optim.lr=0.2", "train.max_steps=7", "optim.lr=0.3",
                                                       "data.mean=[0.1,0.2,0.3]"])
    assert cfg.optim.lr == 0.3 and cfg.train.max_steps == 7 and cfg.data.mean == (0.1, 0.2, 0.3)


def test_unknown_key_in_a_recipe_names_it(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, p)
    assert err.value.key == "optim.momentun" and "known:" in str(err.value)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(RunConfig, None, ["optim.lr"])
