"""Layer-gate estimators of d E[CE] / d theta_B = E[CE | xi_B = 1] - E[CE | xi_B = 0] (docs/method.md section 1).

Each returns a term whose theta_B gradient is the estimate (its value is not a loss).

- :func:`conditional_term` (free): gates sampled per example; the difference of the mean
  per-example loss of the examples with the block on and off, in the same forward.
- :func:`exact_term`: one extra forward per block, with every other gate replaying the main
  forward's draw (common random numbers).
- :func:`paired_differences` (the default, ``paired``; :class:`PairedEstimator` keeps its state): layer
  gates sampled once per batch, so E[CE] is affine in theta_B *with train-mode BatchNorm* and
  ``CE(xi_B=1) - CE(xi_B=0)`` of the whole batch, every other gate replaying the main draw, is an unbiased
  estimate of
  d E[CE] / d theta_B.  The second forward starts at block B's input, kept by the main forward
  (the prefix is shared), so it costs only the suffix (counted from
  :func:`system.pruning.complexity.suffix_macs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch

from system.models.anatomy import LAYER_GATE
from system.models.resnet import GatedResNet, gates_of
from system.pruning.complexity import count, suffix_macs
from system.pruning.methods.base import remap_stores
from system.pruning.surgery import PrunePlan, Slices


def conditional_term(layer, per_example_loss: torch.Tensor) -> torch.Tensor | None:
    """sum_B [mean CE(xi_B = 1) - mean CE(xi_B = 0)] * theta_B over the examples of this batch; a block
    without contrast in the batch (every example on, or every one off) gets 0: the price alone moves it.
    The counts stay on the device (no host sync)."""
    loss = per_example_loss.detach()
    terms = []
    for g in layer.values():
        xi = g.last_xi.reshape(-1)
        if xi.numel() != loss.numel():
            raise RuntimeError("conditional estimator: gates must be sampled per example")
        on = (xi > 0.5).to(loss.dtype)
        n_on, n_off = on.sum(), (1 - on).sum()
        diff = (loss * on).sum() / n_on.clamp_min(1) - (loss * (1 - on)).sum() / n_off.clamp_min(1)
        contrast = (n_on > 0) & (n_off > 0)
        terms.append(torch.where(contrast, diff, torch.zeros_like(diff)) * g.theta.reshape(()))
    return cast(torch.Tensor, sum(terms)) if terms else None


def exact_term(model, layer, names: list[str], forward, x, y, loss_fn, per_example_loss) -> torch.Tensor:
    """CE(xi_B=1) - CE(xi_B=0) per example for the blocks ``names`` (one forward each, rescaled to
    all of ``layer``), every other gate replaying the main draw; BN running statistics untouched."""
    scale = len(layer) / len(names)
    main = per_example_loss.detach()
    terms = []
    with replaying(model):
        for n in names:
            g = layer[n]
            xi = g.last_xi
            g.last_xi = 1.0 - xi  # the complement of the main draw, per example
            other = loss_fn(forward(x), y)
            g.last_xi = xi
            xi = xi.reshape(-1).expand(main.shape[0]) if xi.numel() == 1 else xi.reshape(-1)
            terms.append((n, torch.where(xi > 0.5, main - other, other - main).mean()))
    return cast(torch.Tensor, sum(scale * diff * layer[n].theta.reshape(()) for n, diff in terms))


@contextlib.contextmanager
def replaying(model) -> Iterator[None]:
    """Extra forwards under common random numbers: every gate replays its last draw; BatchNorm
    uses the batch statistics but its running statistics and counters are left untouched."""
    gates = gates_of(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # momentum 0 keeps the running statistics; the counter is set aside (None: BN skips its increment),
    # which costs no op, where a copy and a restore would cost two a BatchNorm
    saved = [(m.momentum, m.num_batches_tracked) for m in bns]
    try:
        for m in bns:
            m.momentum, m.num_batches_tracked = 0.0, None
        for g in gates.values():
            g.replay = True
        with torch.no_grad():
            yield
    finally:
        for g in gates.values():
            g.replay = False
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum, m.num_batches_tracked = mom, nbt


def paired_differences(model, layer, picks: list[tuple[int, str]], forward, x, y, loss_fn,
                       per_example_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean ``CE(xi_B=1) - CE(xi_B=0)`` for each block ``(flat index, gate name)`` in ``picks``
    (negative: the block helps), from the main forward's loss and one suffix forward per block with
    the block's per-batch draw flipped and every other gate replaying its draw.

    Needs the main forward to have run with ``model.keep_block_inputs`` (the suffix starts from the
    block's kept input).  Returns 0-d tensors on the loss's device (no host sync)."""
    main = per_example_loss.detach().float().mean()
    out: dict[str, torch.Tensor] = {}
    inputs = model.block_inputs
    if len(inputs) <= max((i for i, _ in picks), default=-1):
        raise RuntimeError("paired estimator: the main forward kept no block inputs (model.keep_block_inputs)")
    with replaying(model):
        for i, n in picks:
            g = layer[n]
            xi = g.last_xi
            if xi is None or xi.numel() != 1:
                raise RuntimeError(f"paired estimator: layer gate {n} must be sampled once per batch")
            g.last_xi = 1.0 - xi
            model.start_at = (i, inputs[i])
            try:
                other = loss_fn(forward(x), y).float().mean()
            finally:
                model.start_at = None
                g.last_xi = xi
            on = xi.reshape(()).to(main.dtype)
            out[n] = (main - other) * (2.0 * on - 1.0)  # CE(on) - CE(off), whichever the main draw was
    return out


class PairedEstimator:
    """The ``paired`` estimator's state: each block's running estimate of CE(on) - CE(off)
    (``paired_memory``), the round-robin position (``paired_blocks`` a measuring step, one step in
    ``paired_every``), the blocks measured so far, and the suffix forwards of the last step in
    full-network forwards (counted in the training MACs)."""

    def __init__(self, blocks: int, memory: float, every: int = 1):
        self.blocks, self.memory, self.every = blocks, memory, every
        self.est: dict[str, torch.Tensor] = {}
        self.picks = 0
        self.seen: set[str] = set()
        self.extra_forwards = 0.0
        self._suffix_spec: object = None  # the spec the cached suffix fractions belong to
        self._suffix: list[float] = []

    def attach(self, layer: dict) -> None:
        for n, g in layer.items():
            self.est.setdefault(n, torch.zeros_like(g.theta.detach()))

    def measures(self, step: int) -> bool:
        """Whether ``step`` measures (one step in ``paired_every``)."""
        return step % self.every == 0

    def term(self, model: GatedResNet, layer, forward, x, y, loss_fn, per_example_loss,
             measure: bool = True) -> torch.Tensor:
        """Sum_B est_B * theta_B: every block's theta gets its running estimate of CE(on) - CE(off);
        with ``measure``, ``paired_blocks`` blocks (round-robin) get a fresh paired difference this step
        (without, no suffix forward runs and the estimates carry over)."""
        picks: list[tuple[int, str]] = []
        if measure:
            flat = [(i, f"{n}.{LAYER_GATE}") for i, (n, _) in enumerate(model.named_blocks())]
            live = [(i, n) for i, n in flat if n in layer]
            k = len(live) if self.blocks == 0 else min(self.blocks, len(live))
            picks = [live[(self.picks + j) % len(live)] for j in range(k)]
            self.picks = (self.picks + k) % len(live)
        diffs = paired_differences(model, layer, picks, forward, x, y, loss_fn, per_example_loss) if picks else {}
        model.block_inputs = []
        suffix = self._suffix_fractions(model) if picks else []
        self.extra_forwards = sum(suffix[i] for i, _ in picks)
        m = self.memory
        for n, d in diffs.items():
            est = self.est[n]
            fresh = d.to(est.dtype).reshape(est.shape)
            # the first difference of a block replaces the zero it started with; a non-finite one is dropped
            new = m * est + (1 - m) * fresh if n in self.seen else fresh
            est.copy_(torch.where(torch.isfinite(fresh), new, est))
            self.seen.add(n)
        names = list(layer)  # (a layer theta has shape (1,)): one product for every block, not a few ops a block
        thetas = [layer[n].theta for n in names]
        return torch.dot(torch.cat([self.est[n] for n in names]).to(thetas[0].dtype), torch.cat(thetas))

    def _suffix_fractions(self, model: GatedResNet) -> list[float]:
        """Each block's suffix forward as a fraction of the network's MACs (kept per spec)."""
        spec = model.spec()
        if self._suffix_spec is not spec:
            total = max(1, count(spec)[0])
            self._suffix, self._suffix_spec = [m / total for m in suffix_macs(spec)], spec
        return self._suffix

    def after_prune(self, plan: PrunePlan, slices: Slices) -> None:
        remap_stores((self.est,), plan, slices)
        self.seen &= set(self.est)

    def state_dict(self) -> dict:
        return {"layer_est": self.est, "layer_seen": sorted(self.seen), "layer_picks": self.picks}

    def load_state_dict(self, state: dict) -> None:
        self.est.clear()
        self.est.update({k: v.clone() for k, v in state.get("layer_est", {}).items()})
        self.seen = set(state.get("layer_seen", []))
        self.picks = int(state.get("layer_picks", 0))


class LayerEstimator:
    """The ``estimator`` of the layer thetas: a term whose theta_B gradient is the estimate (None for
    ``autograd``, whose estimate is the gates' straight-through gradient), and the extra forwards it ran."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.paired = PairedEstimator(cfg.paired_blocks, cfg.paired_memory, cfg.paired_every)
        self.extra_forwards = 0.0  # this step's, in full-network forwards

    def term(self, model: GatedResNet, layer: dict, batch, active: bool, priming: bool,
             step: int) -> torch.Tensor | None:
        """``active``: theta trains this step; ``priming``: the paired estimator measures a block
        before its theta moves (no term; every priming step measures, whatever ``paired_every``)."""
        c = self.cfg
        self.extra_forwards = 0.0
        if not layer or not (active or priming):
            return None
        if c.estimator == "conditional":
            return conditional_term(layer, batch.per_example_loss)
        if c.estimator == "paired":
            term = self.paired.term(model, layer, batch.forward, batch.x, batch.y, batch.loss_fn,
                                    batch.per_example_loss, measure=priming or self.paired.measures(step))
            self.extra_forwards = self.paired.extra_forwards
            return term if active else None
        names = sorted(layer)
        k = len(names) if c.exact_blocks == 0 else min(c.exact_blocks, len(names))
        if k < len(names):
            pick = torch.randperm(len(names))[:k].tolist()
            names = [names[i] for i in sorted(pick)]
        self.extra_forwards = float(k)
        return exact_term(model, layer, names, batch.forward, batch.x, batch.y, batch.loss_fn, batch.per_example_loss)
