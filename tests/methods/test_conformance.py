"""What every registered pruning method must do, in a real (tiny) training run.

- its state round-trips: a fresh instance loaded with ``state_dict()`` holds the same state and
  takes the same decision on the same model;
- its plans are deterministic for a fixed seed (the same event digests, the same final MACs);
- at zero strength it prunes nothing;
- a ``method.target_macs`` is reached (methods declaring ``supports_target``) or refused naming the key.

Adding a method to the registry without a row in ``tests.methods_util.SETTINGS`` (the one table of
per-method test settings) fails :func:`test_every_registered_method_is_covered`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from system.config import ConfigError
from system.pruning.methods import METHODS, StepContext, build_method
from system.trainer import Trainer
from tests.methods_util import SETTINGS, TARGETED, tiny_config


def _run(tmp_path, *over: str, steps: int = 24):
    trainer = Trainer(tiny_config(tmp_path, f"train.max_steps={steps}", *over))
    return trainer, trainer.run()


def _same(a, b, path="state") -> None:
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_every_registered_method_is_covered():
    assert set(SETTINGS) == set(METHODS)
    assert {n for n, m in METHODS.items() if m.supports_target} == set(TARGETED)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_state_round_trip(tmp_path, name):
    """The method's state and the model as they were when the run's first plan was decided: a fresh instance
    loaded with that state takes that same plan on that model (and holds the run's state at its end)."""
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=24", *SETTINGS[name].run))
    old, decide = trainer.method, trainer.method.decide
    first: list = []  # (state before the decision, the model then, the event, its context's step/epoch, the digest)

    def spy(event, ctx):
        before = (copy.deepcopy(old.state_dict()), copy.deepcopy(ctx.model)) if not first else None
        plan = decide(event, ctx)
        if before is not None and plan is not None:
            first.append((*before, event, ctx.step, ctx.epoch, plan.digest()))
        return plan

    old.decide = spy
    summary = trainer.run()
    if name == "none":
        assert not first and summary["prune_events"] == 0
    else:
        assert first and summary["prune_events"] >= 1  # a real decision, with the history that led to it
        state, model, event, step, epoch, digest = first[0]
        fresh = build_method(trainer.cfg.method, trainer.total_steps, weight_decay=trainer.cfg.optim.weight_decay)
        fresh.load_state_dict(state)
        fresh.attach(model)
        _same(state, fresh.state_dict())
        ctx = StepContext(step=step, epoch=epoch, total_steps=trainer.total_steps, model=model)
        plan = fresh.decide(event, ctx)
        assert plan is not None and plan.digest() == digest, (name, event, step)
    # and the state at the end of the run round-trips whole
    end = build_method(trainer.cfg.method, trainer.total_steps, weight_decay=trainer.cfg.optim.weight_decay)
    end.load_state_dict(old.state_dict())
    _same(old.state_dict(), end.state_dict())
    end.attach(trainer.model)
    _same(old.summary(), end.summary(), "summary")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_plans_are_deterministic_for_a_fixed_seed(tmp_path, name):
    runs = [_run(tmp_path / str(i), *SETTINGS[name].run, "train.seed=3", steps=16) for i in range(2)]
    digests = [[e.digest for e in tr.coord.events] for tr, _ in runs]
    assert digests[0] == digests[1] and runs[0][1]["macs"] == runs[1][1]["macs"]
    assert bool(digests[0]) == (name != "none")


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_zero_strength_prunes_nothing(tmp_path, name):
    trainer, summary = _run(tmp_path, *SETTINGS[name].zero)
    assert summary["prune_events"] == 0 and summary["macs"] == summary["macs_dense"]
    assert not trainer.coord.events


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_target_is_reached_or_refused(tmp_path, name):
    if not METHODS[name].supports_target:
        with pytest.raises(ConfigError) as err:
            tiny_config(tmp_path, f"method.name={name}", "method.target_macs=0.5")
        assert err.value.key == "method.target_macs" and f"method '{name}'" in str(err.value)
        return
    _, summary = _run(tmp_path, f"method.name={name}", "method.target_macs=0.5", *TARGETED[name], steps=40)
    assert summary["target_reached"] is True
    assert abs(summary["macs"] / summary["macs_dense"] - 0.5) <= 0.05
