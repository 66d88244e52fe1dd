"""Budgets: method.target_macs lands runs on their target; sweeps over a grid on the local pool;
compare's matched-budget table."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.compare import RunRow, group_runs, matched_table
from system.config import ConfigError
from system.trainer import Trainer
from tests.methods_util import TARGETED, tiny_config

ROOT = Path(__file__).resolve().parents[2]



@pytest.mark.parametrize("method", sorted(TARGETED))
def test_target_is_reached_within_five_points(tmp_path, method):
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.5", *TARGETED[method])
    summary = Trainer(cfg).run()
    frac = summary["macs"] / summary["macs_dense"]
    assert abs(frac - 0.5) <= 0.05, frac
    assert summary["target_reached"] is True
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["target_reached"] is True


def test_variational_budget_is_met_during_training(tmp_path):
    """The dual variable steers E[MACs] to the scheduled budget before the safety-net rounding."""
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.4", *TARGETED["variational"],
                      "method.variational.harden_at=0.9", "tracking.enabled=true", "train.log_every_steps=5")
    trainer = Trainer(cfg)
    summary = trainer.run()
    m = trainer.method
    # the controller is in MLflow at every log interval: nu, E[MACs] and the budget it tracks (1 -> 0.4)
    from mlflow.tracking import MlflowClient

    from system.tracking import local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(tmp_path))
    hist = {k: [(h.step, h.value) for h in client.get_metric_history(summary["run_id"], f"prune/{k}")]
            for k in ("nu", "expected_macs", "budget")}
    total = trainer.total_steps
    logged = [*range(5, total + 1, 5), *([total] if total % 5 else [])]  # every 5 steps and at the last
    assert [s for s, _ in hist["budget"]] == logged == [s for s, _ in hist["nu"]]
    assert hist["budget"][0][1] == 1.0 and hist["budget"][-1][1] == pytest.approx(0.4)
    assert hist["nu"][-1][1] == pytest.approx(m.budget.values()["nu"])
    assert 0.0 < min(v for _, v in hist["expected_macs"]) < 1.0
    # random labels: the data alone pulls theta down, E[MACs] falls under the scheduled budget and the
    # dual variable relaxes the pressure (it would rise if E[MACs] lagged the schedule)
    assert m.expected_macs_at_harden is not None and m.expected_macs_at_harden < 0.4
    assert m.budget.values()["nu"] < m.cfg.nu_start
    # the pruning rule removed structures during training, before the rounding step at 90% (step 36)
    rule = [r for r in m.removals.steps if r[3] == "rule"]
    assert rule and all(r[0] < 36 for r in rule)
    assert summary["method_details"]["macs_removed_by_rule_frac"] > 0.5
    assert abs(summary["macs"] / summary["macs_dense"] - 0.4) <= 0.05


def test_the_rounding_reports_the_units_it_cut_by_their_theta(tmp_path, monkeypatch):
    """summary.json says which thetas the safety-net rounding cut (at 0 but not taken by the rule, under 0.2,
    under 0.5, above): counted here again from the thetas the rounding was handed and the gates it left."""
    import system.pruning.methods.variational.method as vm
    from system.models.anatomy import block_of
    from system.models.resnet import gates_of

    seen = {}
    real = vm.apply_rounding

    def spy(model, unit, layer, *args):
        seen["before"] = {n: t.clone() for n, t in unit.items()}
        real(model, unit, layer, *args)
        seen["after"] = {n: g.theta.detach().clone() for n, g in gates_of(model).items()}

    monkeypatch.setattr(vm, "apply_rounding", spy)
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.4", *TARGETED["variational"],
                      "method.variational.harden_at=0.3")  # early: the cut thetas spread over the bins
    details = Trainer(cfg).run()["method_details"]
    after = seen["after"]
    gone = {block_of(n) for n, t in after.items() if not bool(t.gt(0.5).any())}  # layer off, or a branch emptied
    cut = torch.cat([t[after[n] <= 0.5] for n, t in seen["before"].items() if block_of(n) not in gone])
    expected = {"theta_0": int((cut <= 0).sum()), "under_0.2": int(((cut > 0) & (cut <= 0.2)).sum()),
                "under_0.5": int(((cut > 0.2) & (cut <= 0.5)).sum()), "from_0.5": int((cut > 0.5).sum())}
    assert details["rounding_cut_units"] == expected
    (rounding,) = [r for r in details["removal_steps"] if r[3] == "rounding"]
    assert sum(expected.values()) == rounding[1] > 0


def test_the_fold_at_the_rounding_keeps_the_mean_network(tmp_path, monkeypatch):
    """``harden_fold``: the network the rounding leaves (kept gates at 1, deterministic) computes the mean network
    that trained and was evaluated before it (every gate at its theta), less what the rounding cut; without the
    fold it does not.  Checked inside a real targeted run, at its rounding, on the model itself in eval mode."""
    import copy

    import system.pruning.methods.variational.method as vm
    from system.models.resnet import gates_of, set_gate_mode

    seen = {}
    real = vm.fold_kept_thetas

    def outputs(model, mode, thetas=None):
        m = copy.deepcopy(model).eval()
        if thetas is not None:
            with torch.no_grad():
                for n, g in gates_of(m).items():
                    g.theta.copy_(thetas[n])
        set_gate_mode(m, unit=mode, layer=mode)
        with torch.no_grad():
            return m(seen["x"])

    def spy(model, unit, layer):
        spec = model.spec()
        gen = torch.Generator().manual_seed(0)
        seen["x"] = torch.randn(8, spec.in_channels, spec.input_size, spec.input_size, generator=gen)
        rounded = {n: g.theta.detach().clone() for n, g in gates_of(model).items()}
        before = {**unit, **layer}
        seen["kept_below_1"] = sum(int(((rounded[n] > 0.5) & (t < 0.99)).sum()) for n, t in before.items())
        mean = {n: torch.where(rounded[n] > 0.5, before[n], torch.zeros_like(before[n])) for n in rounded}
        seen["mean"] = outputs(model, "mean", mean)
        seen["unfolded"] = outputs(model, "deterministic")
        seen["folded_counts"] = real(model, unit, layer)
        seen["folded"] = outputs(model, "deterministic")
        return seen["folded_counts"]

    monkeypatch.setattr(vm, "fold_kept_thetas", spy)
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.4", *TARGETED["variational"],
                      "method.variational.harden_at=0.3", "method.variational.harden_fold=true")
    Trainer(cfg).run()
    assert seen["kept_below_1"] > 0  # gates kept at a theta under 1: the jump the fold removes
    units, mean, blocks = seen["folded_counts"]  # what the hardening's log line reports
    assert units + blocks >= seen["kept_below_1"] and 0.0 < mean < 1.0
    torch.testing.assert_close(seen["folded"], seen["mean"], rtol=1e-4, atol=1e-5)
    assert float((seen["unfolded"] - seen["mean"]).abs().max()) > 1e-3


@pytest.mark.parametrize("method", ["taylor", "l1"])
def test_a_target_the_schedule_cannot_reach_is_reported(tmp_path, caplog, method):
    # the ranking's pruning window ends before its first pruning step: nothing can be removed
    cfg = tiny_config(tmp_path, "train.max_steps=20", "method.target_macs=0.5", f"method.name={method}",
                      f"method.{method}.check_every=10", f"method.{method}.start_frac=0.0",
                      f"method.{method}.stop_frac=0.05")
    with caplog.at_level(logging.WARNING):
        summary = Trainer(cfg).run()
    assert summary["target_reached"] is False and summary["macs"] == summary["macs_dense"]
    assert "target not reached" in caplog.text and "method.target_macs=0.500" in caplog.text


@pytest.mark.parametrize("over, needle", [
    (["method.name=variational", "method.target_macs=0"], "(0, 1]"),
    (["method.name=taylor", "method.target_macs=1.5"], "(0, 1]"),
    (["method.name=l1", "method.target_macs=0"], "(0, 1]"),
    (["method.name=egp", "method.target_macs=0.5"], "egp"),
    (["method.name=none", "method.target_macs=0.5"], "prunes nothing; drop it with method.target_macs=null"),
])
def test_bad_targets_are_refused_naming_the_key(tmp_path, over, needle):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, *over)
    assert err.value.key == "method.target_macs" and needle in str(err.value)


@pytest.mark.parametrize("method", sorted(TARGETED))
def test_a_target_below_every_plans_reach_is_refused_before_the_run(tmp_path, method):
    """ResNet-20 without any residual block keeps 1.09% of its MACs (stem, projection shortcuts,
    classifier): a 0.5% target cannot be met by any plan, so the run does not start."""
    cfg = tiny_config(tmp_path, "method.target_macs=0.005", *TARGETED[method])
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert err.value.key == "method.target_macs" and "0.0109 of the dense MACs" in str(err.value), err.value
    assert not (tmp_path / "run").exists()
    Trainer(tiny_config(tmp_path / "ok", "method.target_macs=0.02", *TARGETED[method]))  # above it: builds


@pytest.mark.parametrize("over, key", [
    (["method.variational.theta_travel=-1"], "method.variational.theta_travel"),
    (["method.variational.lr_unit=-0.1"], "method.variational.lr_unit"),
    (["method.variational.estimator=conditional", "method.variational.per_example=false"],
     "method.variational.estimator"),
])
def test_gate_settings_that_cannot_work_fail_at_start(tmp_path, over, key):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "method.name=variational", *over)
    assert err.value.key == key


def _submit(tmp_path, *args):
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    for key in ("SLURM_CONF", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):  # the runs go to run.root's store
        env.pop(key, None)
    cmd = [sys.executable, "-m", "launch.submit", "--config", str(ROOT / "configs" / "demo.yaml"),
           "launch.cluster=local", "launch.array_parallelism=2", "train.threads=1", "train.max_steps=2",
           "train.progress=false", "checkpoint.every_steps=0", f"run.root={tmp_path / 'runs'}",
           f"launch.folder={tmp_path / 'submitit' / '%j'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _finished_runs(tmp_path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], filter_string="attributes.status = 'FINISHED'")
    return sorted(r.info.run_name for r in runs)


@pytest.mark.timeout(900)
def test_sweep_on_the_local_pool_lands_every_run_once(tmp_path):
    grid = ["--sweep", "method.target_macs=0.4,0.6", "--sweep", "train.seed=0,1", "--wait"]
    first = _submit(tmp_path, *grid)
    assert first.returncode == 0, first.stderr[-3000:]
    names = _finished_runs(tmp_path)
    assert len(names) == 4 and len(set(names)) == 4
    assert any("target_macs0.4" in n and "seed1" in n for n in names)
    assert first.stdout.count("started ") == 4
    again = _submit(tmp_path, *grid)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping 4 finished run(s); 0 to run" in again.stdout and "started " not in again.stdout
    assert _finished_runs(tmp_path) == names


def test_sweep_over_an_unknown_key_fails_before_anything_starts(tmp_path):
    r = _submit(tmp_path, "--sweep", "method.variational.nux=1,2")
    assert r.returncode == 2 and "method.variational.nux" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submitit").exists()


def _row(method, target, seed, top1, macs_pct, ds="fmnist-4k", wall=100.0, setting=None):
    return RunRow(run_id=f"{method}{target}{seed}{ds}", run_name=f"{method}-{target}-{seed}", method=method,
                  model="resnet20", top1=top1, macs=macs_pct * 1e6, params=None, macs_removed_pct=100.0 - macs_pct,
                  blocks_removed=0, train_macs_pct=80.0, wall_s=wall, target_macs=target, seed=seed, dataset=ds,
                  setting=setting)


def test_matched_budget_table_picks_the_runs_of_each_budget():
    rows = [
        _row("dense", None, 0, 0.90, 100.0, wall=200.0), _row("dense", None, 1, 0.92, 100.0, wall=200.0),
        _row("variational", 0.5, 0, 0.80, 50.0, wall=150.0), _row("variational", 0.5, 1, 0.84, 52.0, wall=170.0),
        _row("variational", 0.3, 0, 0.70, 30.0), _row("variational", 0.3, 1, 0.72, 31.0),
        _row("taylor", 0.5, 0, 0.85, 49.0), _row("taylor", 0.5, 1, 0.85, 49.0),
        _row("taylor", 0.5, 0, 0.10, 50.0, ds="mnist-4k"),  # another dataset: never mixed in
        _row("egp", None, 0, 0.88, 90.0, setting="iterations=1"),
    ]
    groups = group_runs(rows)
    var50 = next(g for g in groups if g.method == "variational" and g.budget == 0.5 and g.dataset == "fmnist-4k")
    assert var50.n == 2 and var50.top1 == pytest.approx(0.82) and var50.top1_spread == pytest.approx(0.02)
    assert var50.macs_pct == pytest.approx(51.0) and var50.wall_vs_dense == pytest.approx(0.8)
    table = matched_table(groups)
    fm = table.split("dataset mnist-4k")[0]
    line = {ln.split()[0]: ln for ln in fm.splitlines() if ln and ln.split()[0] in ("variational", "taylor", "egp")}
    assert "82.00+-2.00 (2) @51%" in line["variational"] and "71.00+-1.00 (2) @30%" in line["variational"]
    assert "85.00+-0.00 (2) @49%*" in line["taylor"]  # the best at 50%
    assert "88.00+-0.00 (1) @90% [iterations=1]" in line["egp"]
    assert "10.00" in table.split("dataset mnist-4k")[1]


def test_paired_differences_pair_by_seed_with_a_t_interval():
    from launch.compare import paired_differences, paired_table

    rows = [
        _row("taylor", 0.5, 0, 0.80, 50.0), _row("taylor", 0.5, 1, 0.70, 50.0), _row("taylor", 0.5, 2, 0.75, 50.0),
        # +0.01, +0.03, +0.02 over the same seeds: a clear lead, although the spreads overlap
        _row("variational", 0.5, 0, 0.81, 50.0), _row("variational", 0.5, 1, 0.73, 50.0),
        _row("variational", 0.5, 2, 0.77, 50.0),
        _row("variational", 0.5, 3, 0.99, 50.0),  # a seed the reference did not run: not paired
        _row("unit_only", 0.5, 0, 0.78, 50.0),  # one seed: a mean, no interval
    ]
    pairs = {p.method: p for p in paired_differences(rows, "taylor")}
    v = pairs["variational"]
    assert v.n == 3 and v.mean == pytest.approx(0.02)
    half = 4.303 * 0.01 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert v.low == pytest.approx(0.02 - half) and v.high == pytest.approx(0.02 + half)
    assert pairs["unit_only"].n == 1 and pairs["unit_only"].low is None
    assert "taylor" not in pairs
    text = paired_table(list(pairs.values()))
    assert "+2.00 [-0.48, +4.48] (3)" in text and "-2.00 (1)" in text


def test_a_reference_without_a_target_is_paired_with_every_budget():
    """``--reference dense``: the dense runs (no target) pair by seed with each budget's runs."""
    from launch.compare import paired_differences, paired_table

    rows = [_row("dense", None, s, top1, 100.0) for s, top1 in ((0, 0.84), (1, 0.82))]
    rows += [_row("variational", t, s, top1, t * 100) for t, s, top1 in
             ((0.5, 0, 0.83), (0.5, 1, 0.82), (0.3, 0, 0.80), (0.3, 1, 0.79))]
    rows += [_row("taylor", 0.5, 0, 0.85, 50.0)]
    pairs = {(p.method, p.budget): p for p in paired_differences(rows, "dense")}
    assert set(pairs) == {("variational", 0.5), ("variational", 0.3), ("taylor", 0.5)}
    assert pairs[("variational", 0.5)].mean == pytest.approx(-0.005) and pairs[("variational", 0.5)].n == 2
    assert pairs[("variational", 0.3)].mean == pytest.approx(-0.035)
    assert pairs[("taylor", 0.5)].n == 1 and pairs[("taylor", 0.5)].mean == pytest.approx(0.01)
    assert "vs dense at 30%" in paired_table(list(pairs.values()))
    # an untargeted run of any other method is still never paired
    assert all(p.method != "egp" for p in paired_differences([*rows, _row("egp", None, 0, 0.9, 80.0)], "taylor"))


def test_runs_of_two_networks_on_one_dataset_are_never_averaged_or_paired_together():
    """ResNet-20 and ResNet-56 runs in one root share the dataset, budgets, seeds and method names (the
    study's two stages): each network gets its own groups and its own paired differences."""
    from dataclasses import replace

    from launch.compare import paired_differences

    r20 = [_row(m, 0.5, s, top1, 50.0) for m, top1 in (("taylor", 0.80), ("variational", 0.70)) for s in (0, 1)]
    r56 = [replace(_row(m, 0.5, s, top1, 50.0), model="resnet56", run_id=f"56{m}{s}")
           for m, top1 in (("taylor", 0.84), ("variational", 0.86)) for s in (0, 1)]
    groups = {(g.dataset, g.method): g for g in group_runs(r20 + r56)}
    assert groups[("fmnist-4k resnet20", "variational")].top1 == pytest.approx(0.70)
    assert groups[("fmnist-4k resnet56", "variational")].top1 == pytest.approx(0.86)
    pairs = {p.dataset: p for p in paired_differences(r20 + r56, "taylor")}
    assert pairs["fmnist-4k resnet20"].mean == pytest.approx(-0.10) and pairs["fmnist-4k resnet20"].n == 2
    assert pairs["fmnist-4k resnet56"].mean == pytest.approx(+0.02) and pairs["fmnist-4k resnet56"].n == 2


def test_the_lead_controller_lets_go_while_expected_macs_already_falls_to_the_budget():
    """``dual_lead``: after ``target_by`` E[MACs] is above the 50% budget but falling fast enough to reach it
    within the lead (the cascade the rule-share trace of docs/results.md shows).  The plain controller's
    integral keeps winding nu up on the present gap (and so overshoots); the lead controller's unwinds on
    the predicted one, and its nu is the lower.
    Its velocity is state: a controller restored from its state_dict mid-fall steps exactly as the original."""
    from system.pruning.methods.variational.budget import Budget
    from system.pruning.methods.variational.config import VariationalConfig

    def budget(lead):
        return Budget(VariationalConfig(dual_lead=lead), total_steps=300, target=0.5, warmup_steps=60, target_step=120)

    def run(lead, falls, restore_at=None):
        b = budget(lead)
        nus = []
        for i, em in enumerate(falls):
            if i == restore_at:
                state = b.state_dict()
                b = budget(lead)
                b.load_state_dict(state)
            b.expected_macs = em
            b.dual_step(130 + i)
            nus.append((float(b.nu), float(b.nu_i)))
        return nus

    falls = [0.90 - 0.02 * i for i in range(20)]  # 0.90 -> 0.52: at the budget in a few more steps
    plain, lead = run(0.0, falls), run(0.1, falls)  # a lead of 30 steps
    assert all(b[1] > a[1] for a, b in itertools.pairwise(plain))  # the present gap stays positive: integral rises
    peak = max(range(20), key=lambda i: lead[i][1])
    assert peak < 15 and lead[-1][1] < lead[peak][1]  # the predicted gap turns negative: it unwinds before E gets there
    assert all(n < m for (n, _), (m, _) in zip(lead[1:], plain[1:]))
    assert run(0.1, falls, restore_at=12) == lead


def test_the_held_integral_does_not_unwind_while_expected_macs_is_above_the_target():
    """``dual_hold``: blocks leave ahead of the schedule, so E[MACs] falls far under it while still above the
    30% target (ResNet-56, test seed 3: E[MACs] 0.61 at a scheduled 0.85, nu 0.1 -> 0.009).  The plain
    integral unwinds; the held one stays at nu_start until E[MACs] is under the target itself, where it falls
    again, by the smaller of the two gaps.  Above the schedule both integrate alike."""
    from system.pruning.methods.variational.budget import Budget
    from system.pruning.methods.variational.config import VariationalConfig

    def run(hold, ems, start=130):
        b = Budget(VariationalConfig(dual_hold=hold), total_steps=620, target=0.3, warmup_steps=124, target_step=248)
        out = []
        for i, em in enumerate(ems):
            b.expected_macs = em
            b.dual_step(start + i)
            out.append((float(b.nu), float(b.nu_i)))
        return out

    early = [0.95 - 0.02 * i for i in range(20)]   # 0.95 -> 0.57, under the schedule (0.97 -> 0.86) from the start
    plain, held = run(False, early), run(True, early)
    assert plain[-1][1] < 0.09 and all(b[1] < a[1] for a, b in itertools.pairwise(plain))  # unwinds every step
    assert all(n_i == pytest.approx(0.1) for _, n_i in held)       # held at nu_start
    assert all(n < 0.1 for n, _ in held[3:])                       # the proportional part relaxes at once
    under = run(True, [0.25] * 10)                                 # under the target itself: it unwinds again
    assert under[-1][1] < under[0][1] < 0.1
    above = [0.99] * 10                                            # above the schedule: no difference
    assert run(True, above) == run(False, above)


def test_a_lead_outside_the_run_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.variational.dual_lead"):
        tiny_config(tmp_path, "method.variational.dual_lead=1.5")
