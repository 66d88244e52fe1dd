"""A steady-state training step forces no host sync, for every registered method (issue 24, point 1).

On a GPU every ``.item()`` / ``float(t)`` / ``bool(t)`` (``aten._local_scalar_dense``) and every op whose
output size depends on the data (``nonzero``, boolean-mask indexing) stalls the host until the device
queue drains.  A ``TorchDispatchMode`` sees each of them on the CPU as well, so the count holds here:
through the real trainer loop, nothing inside a training step syncs, and between steps only the log
interval's one read of the losses and the methods' decision steps do.
"""

from __future__ import annotations

import collections

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from system.trainer import Trainer
from tests.methods_util import SETTINGS, STRONG, TARGETED, tiny_config

#: ops that force a host-device sync on a GPU
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
            "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave", "aten.equal"}
STEPS, EVERY = 24, 8

#: every registered method (the targeted ones under a target, as the recipes run them), and the
#: conditional layer estimator, whose contrast counts stay on the device
CASES = {
    **{f"{name}-target": [*over, "method.target_macs=0.5"] for name, over in TARGETED.items()},
    "egp": STRONG["egp"],
    "none": SETTINGS["none"].run,
    "variational-conditional": [*TARGETED["variational"], "method.target_macs=0.5",
                                "method.variational.estimator=conditional",
                                "method.variational.layer_per_example=true"],
}


class SyncCounter(TorchDispatchMode):
    """Each sync op, with the loop step it ran at and whether it ran inside ``train_step``."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.trainer = trainer
        self.in_step = False
        self.in_step_syncs: list[tuple[int, str]] = []
        self.between: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            step = self.trainer.state.step
            if self.in_step:
                self.in_step_syncs.append((step, name))
            else:
                self.between[step] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_forces_no_host_sync(tmp_path, case):
    cfg = tiny_config(tmp_path, f"train.max_steps={STEPS}", f"train.log_every_steps={EVERY}", *CASES[case])
    trainer = Trainer(cfg)
    counter = SyncCounter(trainer)
    decisions: set[int] = set()
    in_loop = [False]
    step, decide, loop = trainer.train_step, trainer.maybe_prune, trainer._loop

    def counted_step(x, y):
        counter.in_step = True
        try:
            return step(x, y)
        finally:
            counter.in_step = False

    def counted_decision(event):
        if in_loop[0]:  # the loop's decisions; the FINAL one after it is not excused from the last log step's bound
            decisions.add(trainer.state.step)
        return decide(event)

    def counted_loop():
        in_loop[0] = True
        try:
            with counter:
                loop()
        finally:
            in_loop[0] = False

    trainer.train_step, trainer.maybe_prune, trainer._loop = counted_step, counted_decision, counted_loop
    trainer.run()
    assert trainer.state.step == STEPS
    assert counter.in_step_syncs == [], f"{case}: syncs inside training steps {counter.in_step_syncs[:10]}"
    logs = set(range(EVERY, STEPS + 1, EVERY))
    stray = {s: n for s, n in counter.between.items() if s not in logs | decisions}
    assert stray == {}, f"{case}: syncs between steps outside log and decision steps: {stray}"
    for s in logs - decisions:
        assert counter.between[s] <= 1, f"{case}: {counter.between[s]} syncs at log step {s}"
