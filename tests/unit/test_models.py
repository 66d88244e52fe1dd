"""Gated ResNets: torchvision equivalence, spec round-trip, gate modes."""

import json

import pytest
import torch
import torchvision

from system.models.resnet import Gate, build_model, gates_of, load_torchvision_state_dict, set_gate_mode
from system.models.spec import MODEL_NAMES, ArchSpec, SpecError, dense_spec


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_dense_model_matches_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=7).eval()
    model = build_model(dense_spec(name, num_classes=7, input_size=64)).eval()
    load_torchvision_state_dict(model, tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for n, p in model.named_parameters() if not n.endswith("theta")) == \
        sum(p.numel() for p in tv.parameters())


def test_torchvision_mismatch_is_named():
    model = build_model(dense_spec("resnet18"))
    sd = torchvision.models.resnet34().state_dict()
    with pytest.raises(SpecError, match="does not match resnet18"):
        load_torchvision_state_dict(model, sd)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shortcut", [None, "B"])
def test_spec_model_spec_roundtrip(name, shortcut):
    spec = dense_spec(name, shortcut=shortcut)
    model = build_model(spec)
    assert model.spec() == spec
    assert ArchSpec.from_json(json.dumps(json.loads(spec.to_json()))) == spec


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_forward_shapes(shortcut):
    model = build_model(dense_spec("resnet20", shortcut=shortcut, input_size=28))
    assert model(torch.randn(3, 3, 28, 28)).shape == (3, 10)
    has_proj = any(n.endswith("downsample.0.weight") for n, _ in model.named_parameters())
    assert has_proj == (shortcut == "B")


def test_unknown_model_name_is_named():
    with pytest.raises(SpecError, match="unknown model name 'resnet7'"):
        dense_spec("resnet7")


def test_bad_spec_names_the_block():
    d = json.loads(dense_spec("resnet20").to_json())
    d["blocks"][1][2]["inner"] = [0]
    with pytest.raises(SpecError, match="layer2.2"):
        ArchSpec.from_dict(d)


def test_gate_placement_and_modes():
    model = build_model(dense_spec("resnet50", input_size=32, num_classes=5))
    names = set(gates_of(model))
    assert "layer1.0.gate1" in names and "layer1.0.gate2" in names and "layer1.0.layer_gate" in names
    assert "layer1.0.gate3" not in names  # the stream (conv3) is never unit-gated
    assert len([n for n in names if n.endswith("layer_gate")]) == 16
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    set_gate_mode(model, unit="off", layer="off")
    y_off = model(x)
    set_gate_mode(model, unit="deterministic", layer="deterministic")
    torch.testing.assert_close(model(x), y_off)  # theta = 1 -> all gates on
    set_gate_mode(model, unit="mean", layer="mean")
    torch.testing.assert_close(model(x), y_off)


def test_sampled_gate_is_bernoulli_with_straight_through_gradient():
    torch.manual_seed(0)
    g = Gate(4, "unit")
    g.mode = "sampled"
    with torch.no_grad():
        g.theta.copy_(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    vals = torch.stack([g.value(1, torch.float32).detach()[0] for _ in range(4000)])
    assert set(vals.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(vals.mean(0), torch.tensor([0.0, 1.0, 0.5, 0.25]), atol=0.03, rtol=0)
    x = torch.randn(2, 4, 3, 3)
    y = g(x)
    y.sum().backward()
    xi = (y / x)[0, :, 0, 0].detach()
    torch.testing.assert_close(g.theta.grad, x.sum(dim=(0, 2, 3)))  # dL/dxi, whatever xi was
    assert torch.equal(xi, xi.round()) and set(xi.tolist()) <= {0.0, 1.0}  # a draw, not theta (0.5 and 0.25 are not)


def test_per_example_sampling_differs_across_examples():
    torch.manual_seed(0)
    g = Gate(64, "unit")
    g.mode, g.per_example = "sampled", True
    with torch.no_grad():
        g.theta.fill_(0.5)
    v = g.value(8, torch.float32)
    assert v.shape == (8, 64) and not torch.equal(v[0], v[1])


def test_hardened_gates_skip_the_multiply_and_notice_theta_changes():
    """Deterministic gates that are all on return their input untouched (no multiply); a theta
    changed in place (a load, a rounding) is seen at the next forward, without a per-forward sync."""
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet20", num_classes=4, input_size=16)).eval()
    set_gate_mode(model, unit="deterministic", layer="deterministic")
    x = torch.randn(2, 3, 16, 16)
    gate = model.layer1[0].gate1
    seen = {}
    gate.register_forward_hook(lambda m, i, o: seen.update(same=o is i[0], out=o))
    with torch.no_grad():
        ref = model(x)
        assert seen["same"]  # skipped: the very input tensor comes back
        for g in gates_of(model).values():
            g.force = 1.0  # the old multiply by ones
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        assert not seen["same"]
        for g in gates_of(model).values():
            g.force = None
        gate.theta[3] = 0.0  # in place: unit 3 is now off
        model(x)
        assert not seen["same"] and bool((seen["out"][:, 3] == 0).all())
        assert bool((seen["out"][:, 2] != 0).any())


@pytest.mark.parametrize("per_example", [False, True])
def test_the_models_one_draw_is_each_gates_bernoulli_with_its_straight_through_gradient(per_example):
    """Inside the model every sampled gate is drawn at once (draw_gates): each unit is still on with
    probability theta, per example when asked, and theta's gradient is dL/dxi at the drawn value,
    the gradient the mean network gets with theta set to that draw."""
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet20", num_classes=4, input_size=8)).eval()  # eval BN: rows independent
    set_gate_mode(model, unit="sampled", layer="sampled")
    gates = gates_of(model)
    probs = {}
    with torch.no_grad():
        for i, (n, g) in enumerate(gates.items()):
            g.per_example = per_example
            g.theta.copy_(torch.linspace(0.1, 0.9, g.theta.numel()).roll(i))
            probs[n] = g.theta.detach().clone()
    x = torch.randn(4, 3, 8, 8)
    draws = {n: [] for n in gates}
    with torch.no_grad():
        for _ in range(300):
            model(x)
            for n, g in gates.items():
                assert g.last_xi.shape == (4 if per_example else 1, g.theta.numel())
                draws[n].append(g.last_xi)
    for n, p in probs.items():
        mean = torch.cat(draws[n]).mean(0)
        rows = 300 * (4 if per_example else 1)
        torch.testing.assert_close(mean, p, atol=4.5 * (0.25 / rows) ** 0.5, rtol=0)  # within 4.5 sd
    # the gradient: straight-through from one draw == the mean network's at theta = that draw
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    xi = {n: g.last_xi.clone() for n, g in gates.items()}
    grad = {n: g.theta.grad.clone() for n, g in gates.items()}
    if per_example:  # a per-example draw has no mean-network twin: check a draw differs across examples
        assert any(not torch.equal(v[0], v[1]) for v in xi.values())
        return
    set_gate_mode(model, unit="mean", layer="mean")
    with torch.no_grad():
        for n, g in gates.items():
            g.theta.copy_(xi[n][0])
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    for n, g in gates.items():
        torch.testing.assert_close(grad[n], g.theta.grad, rtol=1e-4, atol=1e-5)
    # (a unit of a block drawn off gets 0; the others carry the data's gradient)
    assert sum(float(v.abs().sum()) > 0 for v in grad.values()) > len(grad) // 2


def test_a_share_of_the_examples_draws_the_others_multiply_by_theta():
    """``sampled_frac`` (method.variational.unit_sampled_frac): the first round(f B) examples of a batch draw
    their unit gates, the same draws as with f = 1 under the same seed; the others multiply by theta (the mean
    gate), so their output is the mean network's; theta's gradient is the sum over examples of dL/dz at each
    example's value, or over the drawn examples alone with ``undrawn_grad`` false (eval BatchNorm: the examples
    are independent and the loss is a sum over them)."""
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet20", num_classes=4, input_size=8)).eval()
    set_gate_mode(model, unit="sampled", layer="off")
    gates = {n: g for n, g in gates_of(model).items() if g.kind == "unit"}
    with torch.no_grad():
        for i, g in enumerate(gates.values()):
            g.per_example = True
            g.theta.copy_(torch.linspace(0.2, 0.8, g.theta.numel()).roll(i))
    x = torch.randn(8, 3, 8, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        model(x)
    full = {n: g.last_xi.clone() for n, g in gates.items()}
    grads, outs = {}, {}
    for undrawn_grad in (True, False):
        for g in gates.values():
            g.sampled_frac, g.undrawn_grad = 0.25, undrawn_grad
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        outs[undrawn_grad] = model(x)
        outs[undrawn_grad].square().sum().backward()
        grads[undrawn_grad] = {n: g.theta.grad.clone() for n, g in gates.items()}
    out = outs[True]
    torch.testing.assert_close(outs[False], out, rtol=0, atol=0)  # the same forward either way
    mixed = {n: g.last_xi.clone() for n, g in gates.items()}
    for n, g in gates.items():
        assert torch.equal(mixed[n][:2], full[n][:2])  # the drawn examples: the f = 1 draws
        assert torch.equal(mixed[n][2:], g.theta.detach().expand(6, -1))  # the others: theta
    assert any(not torch.equal(full[n][2:], mixed[n][2:]) for n in gates)
    # the undrawn examples' output is the mean network's
    set_gate_mode(model, unit="mean", layer="off")
    with torch.no_grad():
        torch.testing.assert_close(out[2:], model(x[2:]), rtol=1e-5, atol=1e-5)
    # theta's gradient: per example, the mean network's at theta = that example's value, summed
    per_row = []
    for r in range(8):
        with torch.no_grad():
            for n, g in gates.items():
                g.theta.copy_(mixed[n][r])
        model.zero_grad(set_to_none=True)
        model(x[r:r + 1]).square().sum().backward()
        per_row.append({n: g.theta.grad.clone() for n, g in gates.items()})
    for n in gates:
        torch.testing.assert_close(grads[True][n], sum(pr[n] for pr in per_row), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[False][n], sum(pr[n] for pr in per_row[:2]), rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(grads[True][n], grads[False][n]) for n in gates)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
@pytest.mark.parametrize("layer_per_example", [False, True])
def test_the_layer_gate_folded_into_the_last_batchnorm_is_the_multiply(name, layer_per_example):
    """A per-batch layer gate scales the branch's last BatchNorm (weight and bias) instead of multiplying
    its output: in training mode, with straight-through layer gates and some blocks drawn off, the
    output, every gradient (theta's included) and the running statistics equal the multiply's; the
    forward multiplies no feature map for a layer gate (only the unit gates' do).  A per-example layer
    gate (the conditional estimator) still multiplies."""
    import copy
    import types

    from torch.utils._python_dispatch import TorchDispatchMode

    def multiply_forward(self, x):  # the formula the fold replaces
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(identity + self.layer_gate(self.branch(x)))

    class FeatureMapMuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.mul and out.dim() == 4 and out.shape[2] > 1:
                FeatureMapMuls.n += 1
            return out

    torch.manual_seed(0)
    size = 16 if name == "resnet20" else 64  # every feature map at least 2 x 2
    model = build_model(dense_spec(name, num_classes=4, input_size=size)).train()
    set_gate_mode(model, unit="sampled", layer="sampled")
    with torch.no_grad():
        for g in gates_of(model).values():
            g.per_example = g.kind == "unit" or layer_per_example
            g.theta.fill_(0.5 if g.kind == "layer" else 0.8)
    ref = copy.deepcopy(model)
    for _, blk in ref.named_blocks():
        blk.forward = types.MethodType(multiply_forward, blk)
    x = torch.randn(6, 3, size, size)
    torch.manual_seed(1)
    with FeatureMapMuls():
        out = model(x)
    folded_muls, FeatureMapMuls.n = FeatureMapMuls.n, 0
    torch.manual_seed(1)
    with FeatureMapMuls():
        want = ref(x)
    units = sum(g.kind == "unit" for g in gates_of(model).values())
    layers = sum(g.kind == "layer" for g in gates_of(model).values())
    assert FeatureMapMuls.n == units + layers
    assert folded_muls == units + (layers if layer_per_example else 0)
    drawn = torch.cat([g.last_xi.reshape(-1) for g in gates_of(model).values() if g.kind == "layer"])
    assert bool((drawn == 0).any()) and bool((drawn == 1).any())  # some branches off, some on
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    want.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    layer_grads = [g.theta.grad for g in gates_of(model).values() if g.kind == "layer"]
    assert all(float(v.abs().sum()) > 0 for v in layer_grads)  # a branch drawn off still measures dL/dz
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=n)
