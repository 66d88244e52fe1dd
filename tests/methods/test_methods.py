"""Every pruning method trains, prunes when strong, stays consistent; the config tree rejects bad input."""

import json
import time

import pytest
import torch

from launch.inspect import main as inspect_main
from system.config import ConfigError
from system.models.resnet import gates_of
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config


def _train(tmp_path, *overrides, steps=24, spent: dict[str, float] | None = None):
    """A run; with ``spent``, the seconds its evaluations and pruning decisions took, timed around the work itself
    (``Trainer._evaluate`` / ``_prune``), independently of the trainer's own ``time_s`` split."""
    cfg = tiny_config(tmp_path, f"train.max_steps={steps}", *overrides)
    trainer = Trainer(cfg)
    if spent is not None:
        for part, name in (("eval", "_evaluate"), ("prune", "_prune")):
            spent[part] = 0.0
            inner = getattr(trainer, name)

            def timed(*a, _inner=inner, _part=part, **k):
                t = time.perf_counter()
                try:
                    return _inner(*a, **k)
                finally:
                    spent[_part] += time.perf_counter() - t

            setattr(trainer, name, timed)
    summary = trainer.run()
    return trainer, summary


@pytest.mark.parametrize("method", sorted(STRONG))
def test_strong_method_removes_structures_and_summary_matches_inspect(tmp_path, method, capsys):
    spent: dict[str, float] = {}
    trainer, summary = _train(tmp_path, *STRONG[method], spent=spent)
    assert summary["prune_events"] >= 1
    assert summary["channels_removed"] + summary["blocks_removed"] > 0
    assert summary["macs"] < summary["macs_dense"]
    assert summary["train_macs"] < summary["train_macs_dense"]  # later steps were cheaper
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["macs"] == summary["macs"]
    capsys.readouterr()
    assert inspect_main([str(run / "final" / "spec.json"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["macs"], rec["params"]) == (summary["macs"], summary["params"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["name"] == trainer.cfg.method.name
    for k in ("method", "model", "top1", "macs", "params", "macs_dense", "params_dense", "blocks_removed",
              "channels_removed", "train_macs", "train_macs_dense", "wall_s"):
        assert k in on_disk
    # where the wall-clock went: the evaluation and the pruning events timed apart, the steps the rest
    split = on_disk["time_s"]
    assert set(split) == {"steps", "eval", "prune", "checkpoint"}
    assert split["eval"] > 0 and split["prune"] > 0 and split["steps"] > 0
    for part in ("eval", "prune"):  # each part holds all of its work and nothing else (the split rounds to ms)
        assert spent[part] - 0.002 <= split[part] <= spent[part] + 0.05, (part, split, spent)
    assert sum(split.values()) == pytest.approx(on_disk["wall_s"], abs=0.01)


def test_training_macs_per_step_drop_after_a_removal(tmp_path):
    _trainer, summary = _train(tmp_path, *STRONG["variational"], steps=12)
    # recompute: if every step had run on the final (smaller) network, train MACs would be lower still
    per_step_dense = summary["train_macs_dense"] / summary["steps"]
    per_step_final = 3.0 * summary["macs"] * 16
    assert per_step_final < per_step_dense
    assert per_step_final * summary["steps"] <= summary["train_macs"] < summary["train_macs_dense"]


@pytest.mark.parametrize("method", ["variational", "unit_only", "layer_only"])
def test_theta_stays_in_unit_interval(tmp_path, method):
    cfg = tiny_config(tmp_path, "train.max_steps=20", *STRONG[method])
    trainer = Trainer(cfg)
    seen = []
    orig = trainer.method.after_step

    def spy(model, step):
        orig(model, step)
        seen.extend(float(v) for g in gates_of(model).values() for v in g.theta.detach().flatten())

    trainer.method.after_step = spy
    trainer.run()
    assert seen and min(seen) >= 0.0 and max(seen) <= 1.0
    assert min(seen) == 0.0  # the projection was actually exercised


def test_egp_reports_sparsity(tmp_path):
    _trainer, summary = _train(tmp_path, *STRONG["egp"])
    det = summary["method_details"]
    assert 0.5 < det["sparsity"] < 1.0 and det["iterations"] == 3


@pytest.mark.parametrize("override, key", [
    ("method.variational.alpha=1.5", "method.variational.alpha"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.learning_rate=0.1", "optim.learning_rate"),
    ("model.name=resnet7", "model.name"),
    ("data.batch_size=0", "data.batch_size"),
    ("method.name=magic", "method.name"),
])
def test_bad_config_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, override)
    assert err.value.key == key


def test_cli_refuses_bad_config_before_training(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/demo.yaml",
                        "method.variational.alpha=1.5", f"run.root={tmp_path}"], capture_output=True, text=True)
    assert r.returncode == 2 and "method.variational.alpha" in r.stderr
    assert not (tmp_path / "demo").exists()


def test_data_gradient_reaches_theta_without_any_price(tmp_path):
    """With no complexity price at all (the theta of a priced run would move anyway), the data path
    alone gives every layer theta (paired estimator, every block differenced this step) and most unit
    thetas a gradient."""
    cfg = tiny_config(tmp_path, "train.max_steps=1", *STRONG["variational"], "method.variational.paired_blocks=0")
    trainer = Trainer(cfg)
    trainer.method.budget.nu = 0.0  # theta active (nu > 0 in the config) but priced at zero this step
    with torch.no_grad():
        for g in gates_of(trainer.model).values():
            # units: both outcomes occur in the batch; blocks: always on (a block drawn off for the
            # batch would cut its units' gradients), the paired difference still sees them off
            g.theta.fill_(0.5 if g.kind == "unit" else 1.0)
    x = torch.randn(16, 3, 16, 16)
    y = torch.randint(0, 4, (16,))
    seen = {}
    orig = trainer.method.after_backward

    def spy(model, step, grad_scale=1.0):
        seen.update({n: g.theta.grad.clone() for n, g in gates_of(model).items() if g.theta.grad is not None})
        orig(model, step, grad_scale)

    trainer.method.after_backward = spy
    trainer.method.cfg = type(trainer.method.cfg)(**{**trainer.method.cfg.__dict__, "drive": 0.0})
    trainer.train_step(x, y)
    layer = [v for n, v in seen.items() if n.endswith("layer_gate")]
    unit = torch.cat([v for n, v in seen.items() if not n.endswith("layer_gate")])
    assert layer and all(float(v.abs().sum()) > 0 for v in layer)
    assert float((unit != 0).float().mean()) > 0.8


def test_method_refuses_a_model_variant_it_cannot_handle(tmp_path):
    cfg = tiny_config(tmp_path, "model.zero_init_residual=true", *STRONG["variational"])
    with pytest.raises(ValueError, match="method.name.*zero-initialised residual.*layer_gate"):
        Trainer(cfg)
    # unit-only has no layer gates: the same model variant is fine
    Trainer(tiny_config(tmp_path, "model.zero_init_residual=true", *STRONG["unit_only"]))


def test_taylor_score_from_batchnorm_is_the_gates_dl_dz_squared(tmp_path):
    """Taylor reads (gamma dL/dgamma + beta dL/dbeta)^2 off each unit's BatchNorm in a real training step
    (its gates off: no multiply in the step); the same batch through the same weights with the unit gates
    on at z = 1 (mode ``mean``) gives (dL/dz)^2 on theta, and the two agree unit by unit."""
    from system.models.resnet import set_gate_mode

    cfg = tiny_config(tmp_path, "train.max_steps=4", *STRONG["taylor"], "method.taylor.start_frac=0.0",
                      "method.taylor.check_every=2")
    trainer = Trainer(cfg)
    model, method = trainer.model, trainer.method
    assert all(g.mode == "off" for g in gates_of(model).values())  # the step runs no gate
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    scores = {}
    orig = method.batch_scores

    def spy(m, grad_scale):
        out = orig(m, grad_scale)
        scores.update({n: s.clone() for n, s in out.items()})
        return out

    method.batch_scores = spy
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step(x, y)
    assert scores and len(scores) == sum(1 for g in gates_of(model).values() if g.kind == "unit")
    # the reference: same weights and batch, the gates multiplying by 1, dL/dz read on theta
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    set_gate_mode(model, unit="mean", layer="off")
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for n, s in scores.items():
        ref = gates_of(model)[n].theta.grad.pow(2)
        assert float(ref.abs().sum()) > 0
        torch.testing.assert_close(s, ref, rtol=1e-3, atol=1e-12)
