"""Section ``method.variational``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from system.config import check


@dataclass(frozen=True)
class VariationalConfig:
    """Section ``method.variational``.  Defaults: see docs/results.md for how they were chosen."""

    unit_gates: bool = True  # a gate per unit (channel of a block's inner convs)
    layer_gates: bool = True  # a gate per residual block (the block leaves as a whole)
    # accuracy vs pruning strength without a target (under method.target_macs nu is the controller's, from nu_start);
    # 0.2 since session 24 (2026-12-07): under the current defaults 0.3 was -2.02 under dense on the validation split
    # (5 seeds), 0.2 -1.32 at about 69% of the MACs (issue 22: within 2 points); 0.3 from 2026-12-06, 1 before (a
    # fifth of the MACs at -3.3 points); docs/results.md, "Without a target, again"
    nu: float = 0.2
    alpha: float = 1.0  # MACs (1) vs parameters (0)
    beta: float = 1.0  # layer vs unit balance (scale of the layer-gate price)
    theta_step: Literal["normalized", "raw"] = "normalized"  # theta gradients divided by their price, or plain
    # normalized: a normalised gradient of 1 moves theta across [0, 1] in this fraction of the run (under a target,
    # the kinds step_per_nu divides by nu at any nu, the others at nu: 1/nu times slower); also the dual rate
    theta_travel: float = 0.05
    lr_unit: float = 1.0  # raw: theta learning rates (SGD with theta_momentum, projected to [0, 1])
    lr_layer: float = 0.01  # raw: the layer thetas' learning rate
    # [ours] normalized, under a target: the step of these kinds is divided by nu (>= nu_floor), so a structure
    # whose importance per cost is well below nu leaves at full speed whatever nu's scale (decisions unchanged)
    step_per_nu: Literal["none", "layer", "all"] = "layer"
    nu_floor: float = 0.01  # step_per_nu divides by max(nu, nu_floor)
    theta_momentum: float = 0.9  # [ours] theta steps on an average of its recent gradients (SGD momentum = dampening)
    warmup_frac: float = 0.2  # weights only for this fraction of the steps
    # layer-gate estimator [ours]: paired (CRN difference, layer gates drawn once per batch, suffix forward),
    # conditional (examples on vs off in one batch; biased near theta 1), exact, autograd (first order; biased)
    estimator: Literal["paired", "conditional", "exact", "autograd"] = "paired"
    paired_blocks: int = 1  # paired: blocks differenced per step, round-robin (0 = all)
    paired_memory: float = 0.5  # paired: share of a block's previous estimate kept at each new difference
    # paired: steps between measurements (1: every step); between them every layer theta still steps on its
    # running estimate, so only the refresh rate drops (the warm-up's priming measures every step)
    paired_every: int = 1
    exact_blocks: int = 0  # exact: blocks differenced per step (0 = all)
    per_example: bool = True  # sample unit gates per example
    # [ours] per example (per_example: true; per batch it does nothing): the share of a batch's examples whose unit
    # gates draw; the others multiply by theta (the gate's mean), so the weights train under less random dropout
    # while theta still sees drawn gates (1: all draw, the method as published). 0.5 since session 14 (was 1):
    # +0.55 points on the validation split at a 50% target, 5 paired seeds (docs/results.md, "Fewer drawn examples")
    unit_sampled_frac: float = 0.5
    # [ours] unit_sampled_frac < 1: the undrawn examples' dL/dz at z = theta enters theta's gradient (true), or theta
    # learns from the drawn examples' straight-through gradient alone (false: at 0.25, +0.10 points on val where true
    # gave +0.64; docs/results.md, "Fewer drawn examples")
    unit_undrawn_grad: bool = True
    layer_per_example: bool = False  # sample layer gates per example (conditional needs it; paired refuses it)
    gated_decay: bool = False  # weight decay of gated weights scaled by theta (in the loss)
    # budget mode (method.target_macs): dual ascent on nu
    target_by: float = 0.4  # the scheduled budget reaches the target at this fraction of the run
    nu_start: float = 0.1  # the dual variable's start under a target
    dual_gain: float = 3.0  # the dual variable's integral gain (log space)
    dual_kp: float = 2.0  # the dual variable's proportional gain (log space)
    # [ours] the controller acts on the gap predicted this fraction of the run ahead (E[MACs] + its velocity x the
    # lead, against the budget due then), so it stops raising nu while the lagging thetas already close the gap
    dual_lead: float = 0.0
    # [ours] anti-windup: the integral part of nu does not fall while E[MACs] is above the target itself (below the
    # schedule, but short of the budget): blocks that leave early put E[MACs] far under the schedule, the integral
    # then unwinds nu (ResNet-56, one seed: 0.1 -> 0.009) and the schedule, once it catches up, finds the price too
    # low to reach the target before the rounding; the proportional part still relaxes at once. Off: on the validation
    # split it gave the rule its share (0.90) at -0.47 / -0.28 points (docs/results.md, "The dual controller's windup")
    dual_hold: bool = False
    # pruning conditions
    check_every: int = 0  # steps between checks; 0 = auto, 2% of the run (at least 1)
    # checks a structure spends at theta <= tau_theta before it may leave (1 since session 10, was 3: with
    # harden_at 0.5 the rule keeps its share; the importance condition reads the same evidence at any patience,
    # the mean over the last check window)
    patience: int = 1
    tau_theta: float = 0.0  # theta at or below this counts as off
    # the removal condition: importance (window mean of data + price >= 0: importance per cost <= nu),
    # signal / grad (its BN output at most tau_w x its peers'), none (theta alone)
    weight_condition: Literal["importance", "grad", "signal", "none"] = "importance"
    tau_w: float = 0.5  # signal condition: the share of the peers' mean BN output
    max_revivals: int = 3  # a structure back from 0 this often leaves at 0 regardless
    # determinism [ours]: a drive to {0, 1}, and a safety-net rounding
    # weight d of s(t) * nu * c_j theta (1 - theta) (s ramps 0 -> 1 from warm-up to target_by); "both" (default
    # since 2026-12-05): towards 0 below theta 0.5 and towards 1 above ("leave 1" at importance per cost
    # < nu (1 - d s), "back from 0" at > nu (1 + d s)): the marginal structures, which the budget leaves
    # between 0 and 1 and so drawn off at random every step, are settled, and the rule removes them at 0;
    # "down": only below 0.5 ("leave 1" stays at < nu). The removal condition (importance) never sees the
    # drive; the drive moves theta, and so when a structure reaches 0 (patience, revivals) and where the
    # rounding finds it. docs/method.md section 7; docs/results.md, "The training cost".
    drive: float = 0.9
    drive_mode: Literal["down", "both"] = "both"  # where the drive acts (see drive)
    harden: Literal["none", "final"] = "final"  # final: round the gates at harden_at; none: only at the end of the run
    # "final": round theta to {0, 1} here and prune; the rest fine-tunes. 0.55 since session 16 (0.5 in sessions
    # 10-15, 0.6 before): under unit_sampled_frac 0.5 the rule's share of the removed MACs fell to 0.68-0.85 at
    # 0.5; at 0.55 it is 0.82-0.90 on the validation split at the same accuracy (-0.11 points, 5 paired seeds;
    # docs/results.md, "The rule's share under unit_sampled_frac 0.5")
    harden_at: float = 0.55
    # [ours] at the rounding, each kept gate's theta (before it is rounded to 1) is folded into the weights that
    # read it: a unit's into its consumer conv's input channel, a block's into its last BatchNorm's weight and bias.
    # The network after the rounding then computes the mean network (gates at theta) that trained and was
    # evaluated before it, less the cut structures; false: the kept gates jump from theta to 1 (the method as
    # published). True since session 23: +0.17 [+0.03, +0.30] points on the validation split at a 50% target, every
    # seed of 5 at or above, the same decisions (docs/results.md, "The fold at the rounding")
    harden_fold: bool = True
    eval_gates: Literal["mean", "deterministic"] = "mean"  # before hardening
    threshold: float = 0.5  # deterministic gate: xi = 1[theta > threshold]
    # while theta is held at 1 (the warm-up) the gates pass their input and theta's gradient is read off the
    # BatchNorms: the same run, cheaper (docs/method.md, "Idle gates"); false draws and multiplies them (to measure)
    idle_gates: bool = True

    def __post_init__(self) -> None:
        check(self.nu >= 0, "nu", "must be >= 0")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.beta >= 0, "beta", "must be >= 0")
        check(0.0 < self.theta_travel <= 1.0, "theta_travel", f"must be in (0, 1], got {self.theta_travel}")
        check(self.nu_floor > 0, "nu_floor", f"must be > 0, got {self.nu_floor}")
        check(self.lr_unit >= 0, "lr_unit", f"a theta learning rate must be >= 0, got {self.lr_unit}")
        check(self.lr_layer >= 0, "lr_layer", f"a theta learning rate must be >= 0, got {self.lr_layer}")
        check(0.0 <= self.theta_momentum < 1.0, "theta_momentum", f"must be in [0, 1), got {self.theta_momentum}")
        check(0.0 <= self.warmup_frac < 1.0, "warmup_frac", "must be in [0, 1)")
        check(self.unit_gates or self.layer_gates, "unit_gates", "at least one of unit_gates/layer_gates must be on")
        check(0.0 < self.unit_sampled_frac <= 1.0, "unit_sampled_frac",
              f"must be in (0, 1] (a share of the batch's examples), got {self.unit_sampled_frac}")
        check(self.exact_blocks >= 0, "exact_blocks", "must be >= 0")
        check(self.paired_blocks >= 0, "paired_blocks", "must be >= 0")
        check(0.0 <= self.paired_memory < 1.0, "paired_memory", f"must be in [0, 1), got {self.paired_memory}")
        check(self.paired_every >= 1, "paired_every",
              f"must be >= 1 (steps between measurements), got {self.paired_every}")
        check(self.estimator != "conditional" or self.layer_per_example or not self.layer_gates, "estimator",
              "'conditional' compares examples with the block on and off in one batch: it needs "
              "method.variational.layer_per_example=true (or use 'paired' / 'exact' / 'autograd')")
        check(self.estimator != "paired" or not self.layer_per_example or not self.layer_gates, "layer_per_example",
              "the 'paired' estimator is unbiased because a layer gate is drawn once per batch (E[CE] is then "
              "affine in theta with train-mode BatchNorm): set method.variational.layer_per_example=false or "
              "choose another method.variational.estimator")
        check(self.warmup_frac < self.target_by <= 1.0, "target_by", "must be in (warmup_frac, 1]")
        check(self.dual_gain > 0, "dual_gain", "must be > 0")
        check(self.dual_kp >= 0, "dual_kp", "must be >= 0")
        check(0.0 <= self.dual_lead < 1.0, "dual_lead",
              f"must be in [0, 1) (a fraction of the run), got {self.dual_lead}")
        check(self.nu_start > 0, "nu_start", "must be > 0")
        check(self.check_every >= 0, "check_every", "must be >= 0 (0 = 2% of the run)")
        check(self.patience >= 1, "patience", "must be >= 1")
        check(0.0 <= self.tau_theta < 0.5, "tau_theta", "must be in [0, 0.5)")
        check(self.tau_w >= 0, "tau_w", "must be >= 0")
        check(self.max_revivals >= 1, "max_revivals", "must be >= 1")
        check(0.0 <= self.drive < 1.0, "drive", f"must be in [0, 1) (it is relative to nu), got {self.drive}")
        check(0.0 < self.harden_at <= 1.0, "harden_at", "must be in (0, 1]")
        check(self.harden == "none" or self.harden_at > self.warmup_frac, "harden_at", "must be after warmup_frac")
        check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
