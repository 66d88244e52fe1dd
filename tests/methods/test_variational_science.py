"""The variational method's estimators and reporting, checked on the model itself.

- a unit gate sampled off still gets a data gradient (the gate sits after the ReLU);
- each rank draws its own gate samples while the weights start identical;
- the exact layer estimator replays the main forward's draw (common random numbers), agrees in
  expectation with a brute-force enumeration, and its forwards are counted in the training MACs;
- the summary's top-1 is measured on the exported network;
- theta statistics are unscaled under a loss scaler;
- the rule's window sums only the steps on which theta trains.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from system.export import load_exported
from system.models.resnet import build_model, gates_of, set_gate_mode
from system.models.spec import dense_spec
from system.pruning.methods.variational.estimators import exact_term
from system.state import seed_everything, seed_rank_stream
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config


def test_unit_gate_sampled_off_still_gets_a_data_gradient():
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet20", num_classes=4, input_size=16)).train()
    set_gate_mode(model, unit="sampled", layer="off")
    gates = gates_of(model)
    with torch.no_grad():
        gates["layer2.1.gate1"].theta.zero_()  # every draw is 0: the unit is off in this forward
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    g = gates["layer2.1.gate1"]
    assert torch.all(g.last_xi == 0)
    # the first-order benefit of switching each unit on: non-zero for (almost) every unit
    assert int((g.theta.grad != 0).sum()) >= g.theta.numel() - 2


def test_a_share_of_the_examples_draws_in_the_trainers_steps(tmp_path):
    """``unit_sampled_frac: 0.25`` through the real trainer (a targeted run, theta training from the first
    step): in every step a quarter of the batch's examples draw each unit gate (0 or 1) and the others
    multiply by theta as it stood at that forward; theta trains."""
    trainer = Trainer(tiny_config(tmp_path, "method.name=variational", "method.target_macs=0.5",
                                  "method.variational.warmup_frac=0", "method.variational.unit_sampled_frac=0.25",
                                  "train.max_steps=40"))
    units = {n: g for n, g in gates_of(trainer.model).items() if g.kind == "unit"}
    start = {n: g.theta.detach().clone() for n, g in units.items()}
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    for _ in range(6):
        before = {n: g.theta.detach().clone() for n, g in units.items()}
        trainer.train_step(x, y)
        for n, g in units.items():
            assert g.last_xi.shape == (16, before[n].numel())
            assert bool(((g.last_xi[:4] == 0) | (g.last_xi[:4] == 1)).all())
            assert torch.equal(g.last_xi[4:], before[n].expand(12, -1))
    assert any(not torch.equal(g.theta.detach(), start[n]) for n, g in units.items())
    trainer.engine.close()


def test_ranks_draw_different_gate_samples_from_identical_weights():
    draws, weights = [], []
    for rank in (0, 1):
        seed_everything(7)  # what the trainer does: same init on every rank ...
        model = build_model(dense_spec("resnet20", num_classes=4, input_size=16))
        seed_rank_stream(7, rank)  # ... then each rank's own stream for the gates
        set_gate_mode(model, unit="sampled", layer="sampled", per_example=True)
        with torch.no_grad():
            for g in gates_of(model).values():
                g.theta.fill_(0.5)
        model(torch.randn(4, 3, 16, 16))
        draws.append(torch.cat([g.last_xi.flatten() for g in gates_of(model).values()]))
        weights.append(model.conv1.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(draws[0], draws[1])


def _tiny_layer_model():
    torch.manual_seed(1)
    spec = dense_spec("resnet20", num_classes=3, input_size=8)
    model = build_model(spec)
    set_gate_mode(model, unit="off", layer="sampled")
    thetas = [0.8, 0.6, 0.5, 0.7]  # four sampled blocks (the others always on): 8 configurations of the rest
    layer = [g for g in gates_of(model).values() if g.kind == "layer"]
    with torch.no_grad():
        for g, t in zip(layer[::2], thetas):
            g.theta.fill_(t)
    for g in layer[1::2]:
        g.mode = "off"
    return model.eval()  # eval-mode BN: each configuration's loss is a fixed number


def _loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def test_exact_estimator_replays_the_draw_and_matches_brute_force():
    model = _tiny_layer_model()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    layer = {n: g for n, g in gates_of(model).items() if g.kind == "layer" and g.mode == "sampled"}
    names = sorted(layer)
    target = names[2]
    th = {n: float(layer[n].theta.detach()) for n in names}

    # brute force: d E[CE] / d theta_B = sum over the other gates' configurations of P(config) * (CE(1) - CE(0))
    exact = 0.0
    with torch.no_grad():
        others = [n for n in names if n != target]
        for bits in itertools.product((0.0, 1.0), repeat=len(others)):
            p = 1.0
            for n, b in zip(others, bits):
                layer[n].force = b
                p *= th[n] if b else 1 - th[n]
            vals = []
            for v in (1.0, 0.0):
                layer[target].force = v
                vals.append(float(_loss(model, x, y).mean()))
            exact += p * (vals[0] - vals[1])
        for g in layer.values():
            g.force = None

    estimates, draws = [], set()
    torch.manual_seed(0)
    for _ in range(300):
        main = _loss(model, x, y)
        drawn = {n: layer[n].last_xi.clone() for n in names}
        # the estimator on the sampled blocks (the others are off, so the brute force stays small)
        sur = exact_term(model, layer, names, model, x, y, lambda lg, t: F.cross_entropy(lg, t, reduction="none"),
                         main)
        # replayed, not redrawn: the draw of every gate is still the main forward's
        assert all(torch.equal(layer[n].last_xi, drawn[n]) for n in names)
        draws.add(tuple(float(drawn[n].flatten()[0]) for n in names))
        (grad,) = torch.autograd.grad(sur, [layer[target].theta])
        estimates.append(float(grad))
    est = sum(estimates) / len(estimates)
    sd = (sum((e - est) ** 2 for e in estimates) / (len(estimates) - 1)) ** 0.5
    assert abs(est - exact) < 4 * sd / len(estimates) ** 0.5 + 1e-4, (est, exact, sd)
    assert len(draws) > 1  # the gates really drew: the estimate averages over configurations


def test_exact_estimator_forwards_are_counted_in_training_macs(tmp_path):
    over = [o for o in STRONG["layer_only"] if "nu=" not in o] + [
        "method.variational.nu=0.01", "method.variational.estimator=exact", "method.variational.per_example=false",
        "method.variational.check_every=100"]
    cfg = tiny_config(tmp_path, "train.max_steps=3", "method.variational.harden=none", *over)
    trainer = Trainer(cfg)
    summary = trainer.run()
    blocks = 9
    batch = cfg.data.batch_size
    # no check falls in the 3 steps: every step ran the dense network, plus one forward per block
    assert summary["train_macs"] == pytest.approx((3.0 + blocks) * trainer.dense_macs * batch * 3)
    assert summary["train_macs_dense"] == pytest.approx(3.0 * trainer.dense_macs * batch * 3)


def test_summary_top1_is_the_exported_networks(tmp_path):
    # no hardening during training: the run ends with theta strictly inside (0, 1) for some gates
    over = [o for o in STRONG["variational"] if "nu=" not in o] + ["method.variational.nu=3"]
    cfg = tiny_config(tmp_path, "train.max_steps=12", "train.eval_batches=0", *over)
    trainer = Trainer(cfg)
    summary = trainer.run()
    net = load_exported(tmp_path / "run" / "final")
    from pipelines.loaders import build_loader

    correct = n = 0
    with torch.no_grad():
        for x, y in build_loader(cfg.data, "val", 0, 1, cfg.train.seed, 0):
            keep = y >= 0
            correct += int((net(x[keep]).argmax(1) == y[keep]).sum())
            n += int(keep.sum())
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert n == on_disk["val_images"]
    assert on_disk["top1"] == pytest.approx(correct / n, abs=1e-9)
    assert on_disk["macs"] == summary["macs"]


@pytest.mark.parametrize("method", ["taylor", "variational"])
def test_theta_statistics_are_unscaled_under_a_loss_scaler(tmp_path, method):
    """The same step in fp32 and in fp16 with a loss scale of 2**12: the method's accumulated
    statistics agree (they would differ by the scale, or its square, if read scaled)."""
    over = STRONG["taylor"] if method == "taylor" else STRONG["variational"]
    stats = []
    for precision in ("fp32", "fp16"):
        cfg = tiny_config(tmp_path / precision, "train.max_steps=1", f"train.precision={precision}", *over)
        trainer = Trainer(cfg)
        if trainer.engine.scaler is not None:
            trainer.engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
            assert trainer.engine.grad_scale() == 2.0 ** 12
        torch.manual_seed(0)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
        m = trainer.method
        if method == "taylor":
            trainer.state.step = m.first_check - 1  # inside the scoring window
        trainer.train_step(x, y)
        acc = m.acc if method == "taylor" else m.rule.grad_acc
        stats.append(torch.cat([acc[k].flatten() for k in sorted(acc)]).double())
    ref, half = stats
    assert float(ref.abs().max()) > 0
    ratio = float(half.abs().sum() / ref.abs().sum())
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("target", [None, 0.5])
def test_the_rules_window_holds_only_steps_on_which_theta_trains(tmp_path, target):
    """Through the trainer, with and without a target: the warm-up's steps (theta held at 1, gradients the
    data's alone, not priced) add nothing to the rule's window, and every step after it adds one, so the
    first check after the warm-up judges importance per cost on trained-theta steps only."""
    over = ["method.name=variational", "train.max_steps=10", "method.variational.warmup_frac=0.5",
            "method.variational.target_by=0.8", *([f"method.target_macs={target}"] if target else [])]
    trainer = Trainer(tiny_config(tmp_path, *over))
    m = trainer.method
    assert m.warmup_steps == 5
    torch.manual_seed(0)
    seen = []
    for _ in range(10):
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
        trainer.train_step(x, y)
        seen.append(int(m.rule.grad_n))
        if len(seen) == 5:  # the last warm-up step: theta's gradients were computed, the window is still empty
            assert all(float(v.abs().sum()) == 0 for v in m.rule.grad_acc.values())
    assert seen == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert any(float(v.abs().sum()) > 0 for v in m.rule.grad_acc.values())
