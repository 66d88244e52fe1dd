"""The variational pruning conditions: patience, weight conditions, no endless bouncing, empty branches."""

import torch

from system.models.resnet import build_model, gates_of
from system.models.spec import dense_spec
from system.pruning.methods.variational import Variational, VariationalConfig


def _setup(**kw):
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet20", input_size=16))
    cfg = VariationalConfig(**{"patience": 2, "warmup_frac": 0.0, "harden": "none", **kw})
    m = Variational(cfg, total_steps=1000)
    m.attach(model)
    return model, m


def _set(model, name, idx, value):
    with torch.no_grad():
        gates_of(model)[name].theta[idx] = value


def test_patience_counts_consecutive_checks_at_zero():
    model, m = _setup(weight_condition="none")
    _set(model, "layer1.0.gate1", [3, 5], 0.0)
    assert m._check(model) is None  # one check at zero: not yet
    plan = m._check(model)
    assert plan.units == {"layer1.0.gate1": (3, 5)}


def test_importance_condition_keeps_a_unit_the_objective_pulls_back():
    model, m = _setup(weight_condition="importance")
    _set(model, "layer1.0.gate1", [3, 5], 0.0)
    for _ in range(2):
        m.rule.grad_acc["layer1.0.gate1"][3] = -1.0  # descent would raise theta_3 again
        m.rule.grad_acc["layer1.0.gate1"][5] = +1.0  # descent pushes theta_5 further into 0
        m.rule.grad_n = torch.tensor(1.0)
        plan = m._check(model)
    assert plan.units == {"layer1.0.gate1": (5,)}


def test_signal_condition_looks_at_bn_affine_not_conv_weights():
    model, m = _setup(weight_condition="signal", tau_w=0.5)
    blk = model.layer1[0]
    _set(model, "layer1.0.gate1", [2, 4], 0.0)
    with torch.no_grad():
        blk.bn1.weight[2], blk.bn1.bias[2] = 0.01, 0.0  # carries almost nothing after BN
        blk.bn1.weight[4], blk.bn1.bias[4] = 3.0, 1.0  # still a strong channel if switched back on
        blk.conv1.weight[2].mul_(100.0)  # conv weights do not matter: BN renormalises them
    m._check(model)
    plan = m._check(model)
    assert plan.units == {"layer1.0.gate1": (2,)}


def test_theta_cannot_bounce_back_from_zero_forever():
    model, m = _setup(weight_condition="importance", max_revivals=2, patience=5)
    name = "layer2.1.gate1"
    removed = None
    for i in range(12):
        _set(model, name, [7], 0.0 if i % 2 == 0 else 0.3)  # hits 0, revives, hits 0 ...
        m.rule.grad_acc[name][7] = -1.0  # the data always pulls it back: the importance condition never holds
        m.rule.grad_n = torch.tensor(1.0)
        plan = m._check(model)
        if plan is not None:
            removed = (i, plan.units.get(name))
            break
    assert removed is not None and removed[1] == (7,)
    assert removed[0] <= 2 * 2 + 1  # after max_revivals revivals it goes at its next zero


def test_emptying_a_branch_removes_the_block_when_its_layer_gate_is_also_down():
    model, m = _setup(weight_condition="none", patience=1)
    _set(model, "layer3.2.gate1", slice(None), 0.0)
    _set(model, "layer3.2.layer_gate", [0], 0.0)
    plan = m._check(model)
    assert plan.blocks == ("layer3.2",) and "layer3.2.gate1" not in plan.units


def test_emptying_a_branch_keeps_one_unit_when_the_layer_condition_fails():
    model, m = _setup(weight_condition="none", patience=1)
    _set(model, "layer3.2.gate1", slice(None), 0.0)  # layer gate stays at 1
    plan = m._check(model)
    assert plan.blocks == ()
    assert len(plan.units["layer3.2.gate1"]) == 63  # one unit survives; the block is not emptied


def test_unit_only_empty_branch_goes_as_a_block():
    model, m = _setup(weight_condition="none", patience=1, layer_gates=False)
    _set(model, "layer1.1.gate1", slice(None), 0.0)
    plan = m._check(model)
    assert plan.blocks == ("layer1.1",)
