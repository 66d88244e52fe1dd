"""``train.compile``: the training network's forward compiled with ``torch.compile``, once per network.

A pruning event builds a new, smaller network (surgery never reshapes one in place), so its shapes change
exactly once per event.  The engine hands every network it is given (the first, and each one after an
event) to :class:`Compiler`, which

- drops the previous network's graphs (``torch._dynamo.reset``): they can never run again, and dynamo's
  per-function cache limit (8 graphs) would otherwise make the 9th network run eagerly without a word;
- compiles the new one in place (``nn.Module.compile``: parameter names, state dicts and checkpoints stay
  those of the plain module), with static shapes (``dynamic=False``: every network has one shape);
- counts every graph the backend compiles, per network (:attr:`graphs`).

What a compile costs in wall-clock (the first step after an event) is measured by ``bench/compile_step.py``.

A network compiles a few graphs, not one per step: the training forward, the evaluation forward (other
BN and gate modes), the training forward that keeps the block inputs for the paired layer estimator, and
in the variational warm-up one per phase of its gates (idle, then the layer gates drawn to prime).  The
estimator's suffix forwards run eagerly (:meth:`system.models.resnet.GatedResNet._suffix`, excluded from the
compiled graph), so its round-robin over blocks adds no graph.  ``tests/methods/test_compile.py`` counts them.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch

from system.config import ConfigError

log = logging.getLogger(__name__)


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse a backend that cannot compile here, naming ``train.compile_backend``."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError("train.compile_backend", f"unknown backend {backend!r}; known: {sorted(known)}")
    if backend == "inductor" and device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ConfigError("train.compile_backend", "inductor on CPU builds C++ kernels and no C++ compiler (g++) is "
                                                   "on PATH: install one, or use train.compile_backend=aot_eager")


class Compiler:
    """Compiles each network the engine is given (see the module doc); ``graphs[i]``: graphs of the i-th."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graphs: list[int] = []

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        import torch._dynamo

        out = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)
        self.graphs[-1] += 1
        log.debug("compiled graph %d of network %d (%s)", self.graphs[-1], len(self.graphs), self.backend)
        return out

    def __call__(self, model: torch.nn.Module) -> None:
        """Compile ``model`` in place (its forward, on its next call), dropping every earlier graph."""
        import torch._dynamo

        torch._dynamo.reset()
        self.graphs.append(0)
        suffix = getattr(type(model), "_suffix", None)
        if suffix is not None:  # the paired estimator's suffix forwards stay eager (see the module doc);
            # bound to this model as a method, so a deep copy (the deployed network) rebinds it to the copy
            model._suffix = torch.compiler.disable(suffix).__get__(model)  # type: ignore[method-assign]
        model.compile(backend=self._compile_graph, dynamic=False)

    def summary(self) -> dict[str, Any]:
        return {"backend": self.backend, "networks": len(self.graphs), "graphs": list(self.graphs)}
