"""Surgery is function-preserving, pure and all-or-nothing; optimizer state transplants exactly."""

import copy

import pytest
import torch

from system.models.resnet import build_model, gates_of, set_gate_mode
from system.models.spec import SpecError, dense_spec
from system.pruning.surgery import PrunePlan, apply_plan, plan_from_gates, zero_gates_for
from system.pruning.transplant import transplant_optimizer

CASES = {
    "resnet20A": (dict(name="resnet20", shortcut="A", input_size=16), PrunePlan(
        units={"layer1.0.gate1": (0, 5, 15), "layer2.2.gate1": tuple(range(0, 32, 2))},
        blocks=("layer1.2", "layer2.0", "layer3.1"))),
    "resnet20B": (dict(name="resnet20", shortcut="B", input_size=16), PrunePlan(
        units={"layer3.0.gate1": (1, 2, 3)}, blocks=("layer2.0", "layer2.1"))),
    "resnet50": (dict(name="resnet50", input_size=64, num_classes=10), PrunePlan(
        units={"layer1.0.gate1": (0, 1, 2), "layer1.0.gate2": (63,), "layer4.2.gate2": tuple(range(100))},
        blocks=("layer3.0", "layer3.4", "layer4.1"))),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _model(kw, seed=0):
    torch.manual_seed(seed)
    model = build_model(dense_spec(kw["name"], shortcut=kw.get("shortcut"), input_size=kw["input_size"],
                                   num_classes=kw.get("num_classes")))
    # non-trivial BN statistics and affine parameters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_model_equals_gated_model_with_gates_at_zero(case):
    kw, plan = CASES[case]
    model = _model(kw).eval()
    before = copy.deepcopy(model.state_dict())
    small, spec, _ = apply_plan(model, plan)
    for k, v in model.state_dict().items():  # pure: the input is untouched
        assert torch.equal(v, before[k])
    gated = copy.deepcopy(model)
    zero_gates_for(gated, plan)
    set_gate_mode(gated, unit="deterministic", layer="deterministic")
    set_gate_mode(small, unit="deterministic", layer="deterministic")
    x = torch.randn(4, 3, kw["input_size"], kw["input_size"])
    with torch.no_grad():
        assert _rel(small(x), gated(x)) < 1e-5
    assert spec == small.spec()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for b in plan.blocks:
        assert spec.get_block(b).removed


def test_removed_block_equals_its_shortcut():
    model = _model(dict(name="resnet20", shortcut="B", input_size=16)).eval()
    small, _, _ = apply_plan(model, PrunePlan(blocks=("layer2.0", "layer2.1")))
    x = torch.relu(torch.randn(2, 16, 16, 16))
    with torch.no_grad():
        ds = model.layer2[0].downsample
        torch.testing.assert_close(small.layer2[0](x), torch.relu(ds(x)))
        y = torch.relu(torch.randn(2, 32, 8, 8))
        torch.testing.assert_close(small.layer2[1](y), y)


@pytest.mark.parametrize("bad, match", [
    (PrunePlan(units={"layer9.0.gate1": (0,)}), "layer9.0"),
    (PrunePlan(units={"layer1.0.gate1": (16,)}), r"channels \[16\] of 'layer1.0.gate1'"),
    (PrunePlan(units={"layer1.0.gate2": (0,)}), "layer1.0.gate2"),
    (PrunePlan(units={"layer1.0.gate1": tuple(range(16))}), "remove block 'layer1.0' instead"),
    (PrunePlan(blocks=("layer1.7",)), "layer1.7"),
    (PrunePlan(units={"layer1.0.conv1": (0,)}), "not a unit gate"),
])
def test_bad_plan_is_refused_by_name_and_nothing_changes(bad, match):
    model = _model(dict(name="resnet20", input_size=16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SpecError, match=match):
        apply_plan(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_double_removal_is_refused():
    model = _model(dict(name="resnet20", input_size=16))
    small, _, _ = apply_plan(model, PrunePlan(blocks=("layer1.1",)))
    with pytest.raises(SpecError, match="already removed"):
        apply_plan(small, PrunePlan(blocks=("layer1.1",)))


def test_plan_from_gates_and_digest():
    model = _model(dict(name="resnet20", input_size=16))
    gates = gates_of(model)
    with torch.no_grad():
        gates["layer1.0.gate1"].theta[[2, 4]] = 0.0
        gates["layer2.1.layer_gate"].theta.zero_()
        gates["layer3.2.gate1"].theta.zero_()  # every unit off -> the block goes
    plan = plan_from_gates(model)
    assert plan.units == {"layer1.0.gate1": (2, 4)}
    assert set(plan.blocks) == {"layer2.1", "layer3.2"}
    assert plan.digest() == PrunePlan.from_dict(plan.to_dict()).digest()
    assert plan.digest() != PrunePlan(units={"layer1.0.gate1": (2,)}, blocks=plan.blocks).digest()


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("case", ["resnet20A", "resnet50"])
def test_optimizer_transplant_equals_step_on_gated_model(opt_name, case):
    kw, plan = CASES[case]
    torch.manual_seed(1)
    model = _model(kw).double().train()  # float64: Adam divides by sqrt(v) and amplifies rounding
    set_gate_mode(model, unit="deterministic", layer="deterministic")
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    }[opt_name]
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = make([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    x = torch.randn(4, 3, kw["input_size"], kw["input_size"], dtype=torch.float64)
    y = torch.randint(0, model.fc.out_features, (4,))

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    zero_gates_for(model, plan)
    for _ in range(2):  # build up momentum / Adam moments on the gated model
        step(model, opt)
    small, _, slices = apply_plan(model, plan)
    small_opt = transplant_optimizer(opt, model, small, slices)
    names = {id(p): n for n, p in model.named_parameters()}
    had_state = {names[id(p)] for p in opt.state}
    survivors = {n for n, _ in small.named_parameters()}
    assert {n for n, p in small.named_parameters() if p in small_opt.state} == had_state & survivors
    assert [g["weight_decay"] for g in small_opt.param_groups] == [1e-4 if opt_name != "adamw" else 1e-2, 0.0]
    step(model, opt)
    step(small, small_opt)
    ref, _, _ = apply_plan(model, plan)  # the gated model's survivors after the same step
    for (n, p), (n2, q) in zip(small.named_parameters(), ref.named_parameters()):
        assert n == n2
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
