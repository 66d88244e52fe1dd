"""Collectives: the only place (with the engines and the process-group set-up) touching
torch.distributed.  A no-op wrapper at world size 1.

Example::

    comm = Collectives(rank, world_size, device)
    comm.all_reduce_([t1, t2])                 # mean, in place, one flattened collective
    n, correct = comm.sum_scalars([n, correct])
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from system.pruning.surgery import PrunePlan


def decision_digest(plan: PrunePlan | None, state: dict[str, Any] | None = None) -> str:
    """The plan's digest, extended by the method's decision state (floats written exactly, by repr)."""
    digest = (plan or PrunePlan()).digest()
    if state:
        text = json.dumps({k: repr(v) for k, v in sorted(state.items())}, sort_keys=True)
        digest = hashlib.sha256((digest + text).encode()).hexdigest()[:16]
    return digest


class PlanMismatch(RuntimeError):
    """Ranks disagree on a pruning plan; nothing was changed."""

    def __init__(self, digests: list[str]):
        self.digests = digests
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        majority = max(groups.values(), key=len)
        odd = sorted(r for rs in groups.values() if rs is not majority for r in rs)
        super().__init__(f"pruning plans differ across ranks: rank(s) {odd} disagree with rank(s) {majority} "
                         f"(digests {digests}); nothing was pruned")
        self.ranks = odd


class Collectives:
    """All-reduce, scalar sums, a flag agreement and the plan-digest agreement across ranks."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if (
            self.distributed and dist.get_backend() == "nccl") else torch.device("cpu")

    # -- reductions -----------------------------------------------------------------------
    def all_reduce_(self, tensors: list[torch.Tensor], op: str = "mean") -> None:
        """Reduce ``tensors`` in place across ranks (flattened into one buffer, one collective)."""
        if not self.distributed or not tensors:
            return
        dev = self._comm_device()
        flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= self.world_size
        off = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[off:off + n].view_as(t).to(t.device, t.dtype))
                off += n

    def sum_scalars(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_([t], op="sum")
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object; a no-op in one process)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (``[obj]`` in one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (preemption agreement)."""
        return self.sum_scalars([1.0 if flag else 0.0])[0] > 0

    def agree(self, plan: PrunePlan | None, state: dict[str, Any] | None = None) -> None:
        """All-gather the digest of the plan and of the method's decision ``state`` (for example the
        variational method's nu, which every rank computes for itself); raise PlanMismatch naming the
        odd ranks if they differ."""
        if not self.distributed:
            return
        digest = decision_digest(plan, state)
        out: list[str] = [""] * self.world_size
        dist.all_gather_object(out, digest)
        if len(set(out)) > 1:
            raise PlanMismatch(out)
