"""``optim.restart_at: final``: the learning rate starts its second cosine at the first step trained on the method's
final architecture, in the real training loop (a method that never prunes keeps the plain cosine:
``tests/unit/test_optim.py``)."""

import pytest

from system.pruning.complexity import count
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config

RUNS = {
    # the variational method at a target: the rounding at harden_at fixes the architecture
    "variational": ["method.name=variational", "method.target_macs=0.5", "method.variational.check_every=2",
                    "method.variational.harden_at=0.5"],
    "taylor": [*STRONG["taylor"], "method.taylor.stop_frac=0.6"],
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_the_learning_rate_restarts_where_the_architecture_becomes_final(tmp_path, method):
    cfg = tiny_config(tmp_path, "train.max_steps=20", "optim.restart_at=final", *RUNS[method])
    trainer = Trainer(cfg)
    seen: list[tuple[int, float, int]] = []  # (step, the weights' lr, the MACs the step trained)
    orig = trainer.method.after_step

    def spy(model, step):
        orig(model, step)
        lr = next(g["lr"] for g in trainer.engine.optimizer.param_groups if g["name"] == "decay")
        seen.append((step, lr, count(model.spec())[0]))

    trainer.method.after_step = spy
    summary = trainer.run()
    steps, lrs, macs = zip(*seen)
    rises = [s for s, a, b in zip(steps[1:], lrs, lrs[1:]) if b > a]
    final = trainer.method.final_step
    assert rises == [final], (rises, final)  # one restart, at the method's final step
    assert lrs[steps.index(final)] == pytest.approx(cfg.optim.lr)  # back at the peak (restart_factor 1)
    assert lrs[-1] < 0.1 * cfg.optim.lr  # and annealed again by the end
    first_on_final = next(s for s, m in zip(steps, macs) if all(x == macs[-1] for x in macs[steps.index(s):]))
    assert summary["macs"] < summary["macs_dense"] and first_on_final == final  # pruned: the restart on its first step
    assert summary["lr_restart_at"] == pytest.approx(final / summary["steps"])
