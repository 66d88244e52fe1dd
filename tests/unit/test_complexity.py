"""Exact and expected complexity: reference counts, gradients, enumeration."""

import itertools

import pytest
import torch

from system.models.resnet import build_model, gates_of
from system.models.spec import ArchSpec, BlockSpec, dense_spec
from system.pruning.complexity import count, expected

# docs/method.md section 4, with the precision they are quoted at.
REFERENCE = {
    "resnet20": (40.55e6, 0.270e6, 0.005e6), "resnet56": (125.49e6, 0.853e6, 0.0005e6),
    "resnet110": (252.89e6, 1.728e6, 0.0005e6), "resnet18": (1.814e9, 11.69e6, 0.005e6),
    "resnet50": (4.089e9, 25.56e6, 0.005e6), "resnet101": (7.801e9, 44.55e6, 0.005e6),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_counts(name):
    macs, params = count(dense_spec(name))
    ref_macs, ref_params, half_unit = REFERENCE[name]
    assert abs(macs - ref_macs) / ref_macs < 1e-3
    # within 0.1%, or within the rounding of the quoted figure (0.270M for 269,722)
    assert abs(params - ref_params) <= max(1e-3 * ref_params, half_unit)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_equal_the_models_parameter_count(name):
    spec = dense_spec(name)
    model = build_model(spec, gates=False)
    assert count(spec)[1] == sum(p.numel() for p in model.parameters())


def test_count_of_pruned_spec_matches_model():
    spec = dense_spec("resnet50", input_size=64)
    blocks = [list(st) for st in spec.blocks]
    blocks[0][1] = BlockSpec((10, 7))
    blocks[2][0] = BlockSpec((0, 0), removed=True)
    blocks[2][3] = BlockSpec((0, 0), removed=True)
    import dataclasses
    pruned = dataclasses.replace(spec, blocks=tuple(tuple(s) for s in blocks))
    model = build_model(pruned, gates=False)
    assert count(pruned)[1] == sum(p.numel() for p in model.parameters())
    assert count(pruned)[0] < count(spec)[0]


def _thetas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit, layer = {}, {}
    for n, gate in gates_of(model).items():
        t = torch.rand(gate.theta.shape, generator=g, dtype=torch.float64).requires_grad_(True)
        (layer if gate.kind == "layer" else unit)[n] = t
    return unit, layer


def test_expected_at_ones_is_exact_count():
    spec = dense_spec("resnet56")
    model = build_model(spec)
    unit = {n: torch.ones_like(g.theta, dtype=torch.float64) for n, g in gates_of(model).items() if g.kind == "unit"}
    layer = {n: torch.ones(1, dtype=torch.float64) for n, g in gates_of(model).items() if g.kind == "layer"}
    m, p = expected(spec, unit, layer)
    assert (int(m.item()), int(p.item())) == count(spec)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_expected_gradients_match_finite_differences(name):
    spec = dense_spec(name, input_size=32, num_classes=10)
    unit, layer = _thetas(build_model(spec))
    leaves = list(unit.values()) + list(layer.values())
    for which in (0, 1):
        def f(*ts, which=which):
            return expected(spec, dict(zip(unit, ts[:len(unit)])), dict(zip(layer, ts[len(unit):])))[which]
        grads = torch.autograd.grad(f(*leaves), leaves)
        eps = 1e-4
        for li in [0, 3, len(unit), len(leaves) - 1]:
            for j in [0, leaves[li].numel() - 1]:
                plus = [t.detach().clone() for t in leaves]
                minus = [t.detach().clone() for t in leaves]
                plus[li].view(-1)[j] += eps
                minus[li].view(-1)[j] -= eps
                fd = (f(*plus) - f(*minus)) / (2 * eps)
                assert torch.isclose(grads[li].view(-1)[j], fd, rtol=1e-6, atol=1e-6)


def _tiny_spec(block="basic"):
    inner = (2,) if block == "basic" else (2, 1)
    return ArchSpec(name="tiny", family="cifar" if block == "basic" else "imagenet", block=block,
                    num_classes=3, input_size=8 if block == "basic" else 32, stem_width=4,
                    stage_widths=(4, 8),
                    blocks=((BlockSpec(inner),), (BlockSpec(inner),)), shortcut="B")


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_expected_equals_enumeration_over_all_gate_configurations(block):
    spec = _tiny_spec(block)
    model = build_model(spec)
    unit, layer = _thetas(model, seed=3)
    gates = [(n, i) for n, t in {**unit, **layer}.items() for i in range(t.numel())]
    theta = {**unit, **layer}
    assert len(gates) <= 10
    e_macs = e_params = 0.0
    for bits in itertools.product((0, 1), repeat=len(gates)):
        prob = 1.0
        on = {}
        for (n, i), b in zip(gates, bits):
            p = float(theta[n][i].detach())
            prob *= p if b else 1 - p
            on.setdefault(n, []).append(b)
        blocks = []
        for st in spec.blocks:
            row = []
            for _ in st:
                row.append(None)
            blocks.append(row)
        for name, s, b, blk in spec.iter_blocks():
            widths = tuple(sum(on[f"{name}.gate{i + 1}"]) for i in range(len(blk.inner)))
            removed = on[f"{name}.layer_gate"][0] == 0
            blocks[s][b] = BlockSpec(widths, removed=removed)
        # a kept block with a zero-width inner conv still costs its other convs: count directly
        import dataclasses
        cfg = dataclasses.replace(spec, blocks=tuple(tuple(r) for r in blocks))
        m, p = _count_unvalidated(cfg)
        e_macs += prob * m
        e_params += prob * p
    em, ep = expected(spec, unit, layer)
    assert em.item() == pytest.approx(e_macs, rel=1e-10)
    assert ep.item() == pytest.approx(e_params, rel=1e-10)


def _count_unvalidated(spec):
    from system.pruning.complexity import _walk
    acc = _walk(spec, lambda name, i, w: w, lambda name: 1)
    return acc.macs, acc.params


@pytest.mark.parametrize("name, size", [("resnet20", 16), ("resnet56", 32), ("resnet50", 64)])
def test_closed_form_expected_cost_equals_the_polynomial(name, size):
    """The per-step price's closed form (one vector expression for all blocks) gives the values and
    the theta gradients of :func:`expected`, on a dense and on a pruned spec (a block removed, widths cut),
    with every kind of gate, or only one kind, in the dicts."""
    from system.pruning.complexity import ExpectedCost
    from system.pruning.surgery import PrunePlan, plan_spec

    dense = dense_spec(name, num_classes=10, input_size=size)
    first = dense.block_names()[1]
    pruned, _ = plan_spec(dense, PrunePlan(units={f"{dense.block_names()[0]}.gate1": (0, 1, 2)}, blocks=(first,)))
    for spec in (dense, pruned):
        gates = gates_of(build_model(spec))
        torch.manual_seed(0)
        for kinds in (("unit", "layer"), ("unit",), ("layer",)):
            thetas = {n: torch.rand_like(g.theta, dtype=torch.float64).requires_grad_(True)
                      for n, g in gates.items() if g.kind in kinds}
            unit = {n: t for n, t in thetas.items() if gates[n].kind == "unit"}
            layer = {n: t for n, t in thetas.items() if gates[n].kind == "layer"}
            ref, fast = expected(spec, unit, layer), ExpectedCost(spec)(unit, layer)
            for r, f in zip(ref, fast):
                assert float(f) == pytest.approx(float(r), rel=1e-12)
            g_ref = torch.autograd.grad(ref[0] + ref[1], list(thetas.values()))
            g_fast = torch.autograd.grad(fast[0] + fast[1], list(thetas.values()))
            for a, b in zip(g_ref, g_fast):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-6)
