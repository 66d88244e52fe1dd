"""Parameter groups survive pruning with the same layout a resumed run rebuilds; the LR schedule is pure."""

import math

import pytest

from system.config import ConfigError, load_config
from system.models.resnet import build_model
from system.models.spec import dense_spec
from system.optim import build_optimizer, lr_factor, resolve_restart, set_lrs
from system.pruning.methods import MethodConfig, build_method
from system.pruning.methods.base import Method
from system.pruning.methods.variational import VariationalConfig
from system.pruning.surgery import PrunePlan, apply_plan
from system.pruning.transplant import transplant_optimizer
from system.run_config import OptimConfig, RunConfig

THETA = {"unit": 0.5, "layer": 0.1}


@pytest.mark.parametrize("gated_decay", [False, True])
def test_groups_after_pruning_every_block_match_a_rebuilt_optimizer(gated_decay):
    model = build_model(dense_spec("resnet20", input_size=16))
    cfg = OptimConfig()
    method = build_method(MethodConfig(name="variational", variational=VariationalConfig(gated_decay=gated_decay)),
                          100, weight_decay=cfg.weight_decay)
    exempt = method.decay_exempt(model)
    assert bool(exempt) == gated_decay and all(".conv" in n for n in exempt)
    opt = build_optimizer(model, cfg, THETA, 128, exempt)
    everything = PrunePlan(blocks=tuple(model.spec().block_names()))
    small, _, slices = apply_plan(model, everything)
    moved = transplant_optimizer(opt, model, small, slices)
    rebuilt = build_optimizer(small, cfg, THETA, 128, method.decay_exempt(small))
    assert [g["name"] for g in moved.param_groups] == [g["name"] for g in rebuilt.param_groups]
    assert [len(g["params"]) for g in moved.param_groups] == [len(g["params"]) for g in rebuilt.param_groups]
    rebuilt.load_state_dict(moved.state_dict())  # what resume does: must not raise


def test_lr_schedule_is_a_pure_function_of_the_step():
    cfg = OptimConfig(lr=0.1, warmup_epochs=1, schedule="cosine")
    assert lr_factor(cfg, 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.0)


def test_a_restarted_cosine_starts_again_at_its_fraction_and_ends_at_min_lr():
    plain = OptimConfig(lr=0.1, schedule="cosine")
    cfg = OptimConfig(lr=0.1, schedule="cosine", restart_at=0.6, restart_factor=0.5)
    assert [lr_factor(cfg, s, 100, 10) for s in range(60)] == [lr_factor(plain, s, 100, 10) for s in range(60)]
    assert lr_factor(cfg, 60, 100, 10) == pytest.approx(0.5)  # the second peak
    assert lr_factor(cfg, 60, 100, 10) > lr_factor(plain, 59, 100, 10)  # it goes up where the plain one goes on down
    assert lr_factor(cfg, 80, 100, 10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_factor(cfg, 100, 100, 10) == pytest.approx(0.0)
    # final: the method's final step, as a fraction of the steps after the warm-up; none for a method that never prunes
    final = OptimConfig(restart_at="final", warmup_epochs=1)
    assert resolve_restart(final, 55, 100, 10).restart_at == pytest.approx(0.5)
    assert resolve_restart(final, Method(None, 100).final_step, 100, 10).restart_at == 0.0  # dense: no restart
    assert resolve_restart(final, 100, 100, 10).restart_at == 0.0  # final only after the last step: none either
    for bad in (["optim.schedule=step", "optim.restart_at=0.5"], ["optim.restart_at=1.0"]):
        with pytest.raises(ConfigError, match="optim.restart_at"):  # the dotted key, as a user's override names it
            load_config(RunConfig, "configs/demo.yaml", bad)


def test_theta_lr_is_zero_while_theta_is_not_trained():
    model = build_model(dense_spec("resnet20", input_size=16))
    cfg = OptimConfig(lr=0.1)
    opt = build_optimizer(model, cfg, THETA, 128)
    set_lrs(opt, cfg, 5, 100, 10, theta_on=False)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["theta_unit"] == 0.0 and lrs["theta_layer"] == 0.0 and lrs["decay"] > 0
    set_lrs(opt, cfg, 5, 100, 10, theta_on=True)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["theta_unit"] == 0.5 and lrs["theta_layer"] == 0.1


def test_lr_scales_with_the_global_batch():
    model = build_model(dense_spec("resnet20", input_size=16))
    opt = build_optimizer(model, OptimConfig(lr=0.256, lr_batch=256), THETA, 1024)
    assert {g["name"]: g["base_lr"] for g in opt.param_groups}["decay"] == pytest.approx(1.024)
