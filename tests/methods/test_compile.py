"""``train.compile``: every method trains a compiled network through the real trainer; each network (the
dense one, and the new one after every pruning event) compiles a few graphs once, never one per step;
and the compiled run ends on the same weights as the eager one.

The backend is ``aot_eager`` (dynamo + AOTAutograd, the same graphs and guards that inductor gets, no C++
build): inductor's compile time is a bench figure (bench/compile_step.py), not a test's.
"""

from __future__ import annotations

import pytest
import torch

from system.config import ConfigError
from system.trainer import Trainer
from tests.methods_util import SETTINGS, STRONG, tiny_config

#: the first event comes after about half the run: the dense network lives >= 10 steps and an evaluation
LATE = {"variational": ["method.variational.warmup_frac=0.45", "method.variational.target_by=0.8"],
        "taylor": ["method.taylor.start_frac=0.5", "method.taylor.check_every=6"],
        "l1": ["method.l1.start_frac=0.5", "method.l1.check_every=6"],
        "egp": ["method.egp.start_frac=0.5"]}
RUN = ["train.max_steps=24", "train.eval_every_steps=6", "checkpoint.every_steps=0"]
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
#: graphs one network may compile: training, training keeping block inputs (paired estimator), evaluation, and
#: for the variational warm-up's network the gates' phases (every gate idle, the layer gates drawn to prime)
MAX_GRAPHS = 4


def test_every_method_is_covered():
    assert set(LATE) == set(SETTINGS) - {"none"}


@pytest.mark.parametrize("method", sorted(LATE))
def test_each_network_compiles_once_not_per_step(tmp_path, method):
    summary = Trainer(tiny_config(tmp_path, *STRONG[method], *LATE[method], *RUN, *COMPILED)).run()
    comp = summary["compile"]
    assert summary["prune_events"] >= 1
    assert comp["networks"] == summary["prune_events"] + 1  # the dense one, then one per event
    assert comp["graphs"][0] >= 1  # it did compile (12 steps and an evaluation on the dense network)
    assert all(g <= MAX_GRAPHS for g in comp["graphs"]), comp  # per step it would be >= 12 on the first


def test_compiled_run_ends_on_the_eager_weights(tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("compiled", COMPILED)):
        trainer = Trainer(tiny_config(tmp_path / name, *STRONG["variational"], *RUN, *extra))
        summary = trainer.run()
        runs[name] = (summary, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    (eager, w_eager), (comp, w_comp) = runs["eager"], runs["compiled"]
    assert comp["compile"]["networks"] > 1 and comp["macs"] == eager["macs"]
    assert comp["prune_events"] == eager["prune_events"] and w_comp.keys() == w_eager.keys()
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_unknown_backend_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(tmp_path, "method.name=none", "train.compile=true", "train.compile_backend=nope"))
    assert err.value.key == "train.compile_backend" and "aot_eager" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing half-written
