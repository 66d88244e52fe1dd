"""Parts of a run that carry state, and the protocol they share.

Each part saves and restores its own state; the :class:`~system.runtime.checkpoint.manager.Checkpointer`
only moves those states to and from disk (torchtitan's ``Stateful`` parts under a small manager).
Parts saved per rank go to ``<name>_rank{r}.pt`` (plain tensors and containers); parts saved once go
into the manifest as JSON.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Stateful(Protocol):
    """What a checkpointed part implements."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RngState:
    """This process's torch / CUDA / numpy / python RNG streams, as a part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class ModelBuffers:
    """A module's buffers (BatchNorm statistics are per rank between syncs); ``get_model`` returns the
    current model (surgery replaces it at every pruning event)."""

    def __init__(self, get_model: Callable[[], torch.nn.Module]):
        self.get_model = get_model

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.get_model().named_buffers()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = dict(self.get_model().named_buffers())
        if set(state) != set(own):
            raise ValueError("does not match the spec's model")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)


class Value:
    """A plain JSON value as a part (e.g. the tracking run id)."""

    def __init__(self, **values: Any):
        self.values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.update(state)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / numbers (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        for i in range(min(len(states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(states[i], i)


def derived_rng(seed: int, step: int, rank: int) -> None:
    """Seed a rank that has no saved RNG state (elastic resume onto more ranks), deterministically."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank, 0xC4]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


