"""The variational method's gates idle while theta is held at 1 (its warm-up; the layer gates draw while the
paired estimator primes): such a step costs the dense step plus the draw, and changes nothing else. Through the
real trainer: the run ends on the weights, thetas and removals of the same run with every warm-up gate drawn and
multiplied, and its warm-up steps run the dense step's ops plus a few.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from system.trainer import Trainer
from tests.methods_util import TARGETED, tiny_config

#: 24 steps: 18 of warm-up, whose last 9 prime the paired estimator (ResNet-20's 9 blocks): every gate idles in
#: steps 0-8, the unit gates in 9-17
RUN = ["train.max_steps=24", "checkpoint.every_steps=0", "method.target_macs=0.5",
       "method.variational.warmup_frac=0.75", "method.variational.target_by=0.85",
       "method.variational.harden_at=0.95", "method.variational.check_every=2"]
IDLE = range(0, 9)


class StepOps(TorchDispatchMode):
    """The aten ops of each training step, by step."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer, self.in_step = trainer, False
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_step:
            self.ops[self.trainer.state.step] += 1
        return func(*args, **(kwargs or {}))


def _run(path, *over: str) -> tuple[Trainer, dict, StepOps]:
    trainer = Trainer(tiny_config(path, *RUN, *over))
    counter, step = StepOps(trainer), trainer.train_step

    def counted(x, y):
        counter.in_step = True
        try:
            with counter:
                return step(x, y)
        finally:
            counter.in_step = False

    trainer.train_step = counted
    return trainer, trainer.run(), counter


def test_idle_warm_up_gates_change_nothing_but_the_cost(tmp_path):
    var = TARGETED["variational"]
    idle, s_idle, ops_idle = _run(tmp_path / "idle", *var)
    _, _, ops_dense = _run(tmp_path / "dense", "method.name=none", "method.target_macs=null")
    # the same run with every warm-up gate drawn and multiplied
    drawn, s_drawn, ops_drawn = _run(tmp_path / "drawn", *var, "method.variational.idle_gates=false")

    assert s_idle["prune_events"] >= 1 and s_idle["macs"] == s_drawn["macs"]
    assert s_idle["channels_removed"] == s_drawn["channels_removed"]
    assert s_idle["blocks_removed"] == s_drawn["blocks_removed"]
    w_idle, w_drawn = idle.model.state_dict(), drawn.model.state_dict()
    assert w_idle.keys() == w_drawn.keys()
    for k in w_idle:  # thetas included: their momentum averaged the same warm-up gradients
        torch.testing.assert_close(w_idle[k], w_drawn[k], rtol=1e-5, atol=1e-6, msg=k)

    dense = ops_dense.ops[1]
    for s in IDLE[1:]:  # (step 0 also builds the optimizer's state)
        # the dense step, the draw and theta's bookkeeping (its gradients off the BatchNorms, its momentum,
        # the rule's window): 316 + 42 ops on ResNet-20, where drawing and multiplying the gates adds 150
        assert ops_dense.ops[s] == dense
        more_idle, more_drawn = ops_idle.ops[s] - dense, ops_drawn.ops[s] - dense
        assert more_idle <= 0.4 * more_drawn, (s, more_idle, more_drawn, dense)
    for s in range(9, 18):  # priming: the layer gates draw, the unit gates idle
        assert ops_idle.ops[s] < ops_drawn.ops[s] - 60, (s, ops_idle.ops[s], ops_drawn.ops[s])
    for s in range(18, 24):  # training steps draw and multiply
        assert ops_idle.ops[s] == ops_drawn.ops[s], s
