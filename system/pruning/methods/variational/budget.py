"""The price multiplier nu of the variational method: the user's fixed value, or, under
``method.target_macs``, a dual variable that steers E[MACs] along a schedule to the target
(docs/method.md section 1, budget mode).

Under a target the controller runs every step on the device: nu, its integral part and E[MACs] are
0-d float64 tensors there, so a step forces no host sync; they are read on the host only where a
decision, a log line or a checkpoint needs them (:meth:`Budget.state_dict`, ``decision_state``)."""

from __future__ import annotations

from typing import Any

import torch

from system.pruning.methods.variational.config import VariationalConfig


class Budget:
    """nu, its schedule and its controller.  ``expected_macs`` (E[MACs] / dense MACs) is set by the
    method after each step under a target, and at each check without one.  ``nu``, ``nu_i``, ``nu_max``
    and ``expected_macs`` are floats or 0-d tensors (on the device, once the controller has stepped)."""

    def __init__(self, cfg: VariationalConfig, total_steps: int, target: float | None, warmup_steps: int,
                 target_step: int):
        self.cfg, self.total_steps, self.target = cfg, total_steps, target
        self.warmup_steps, self.target_step = warmup_steps, target_step
        self.nu: Any = cfg.nu_start if target is not None else cfg.nu
        self.nu_i: Any = self.nu  # the integral part of the dual variable (budget mode)
        self.nu_max: Any = self.nu
        self.expected_macs: Any = 1.0
        # dual_lead: E[MACs] of the previous step and its velocity (an average over the lead's horizon)
        self.e_prev: Any = None
        self.e_vel: Any = 0.0

    @property
    def positive(self) -> bool:
        """nu > 0, known without reading it: a dual variable stays in [1e-6, 1e6] x e^-10."""
        return self.target is not None or self.cfg.nu > 0

    def nu_like(self, t: torch.Tensor) -> Any:
        """nu to multiply ``t`` with: the float itself, or the tensor in ``t``'s dtype (as a Python float
        would be cast), so the product keeps ``t``'s precision."""
        return self.nu if isinstance(self.nu, float) else self.nu.to(t.dtype)

    def ramp(self, step: int) -> float:
        """0 at the end of the warm-up, 1 when the budget is due (``target_by``): the drive's weight and
        the budget schedule."""
        return min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.target_step - self.warmup_steps)))

    def scheduled(self, step: int) -> float:
        """m*(t): the budget the dual variable tracks (1 until the warm-up ends, T from ``target_by``)."""
        if self.target is None:
            return 1.0
        return 1.0 - (1.0 - self.target) * self.ramp(step)

    def dual_step(self, step: int) -> None:
        """Budget mode: nu from a PI controller in log space on the relative gap to the scheduled budget.

        ``gap = (E[MACs]/MACs_full - m*(t)) / (1 - T)``; ``log nu_I += dual_gain * gap / (theta_travel * steps)``
        (integral: a gap of one full budget held for one theta travel time multiplies nu by e^dual_gain)
        and ``nu = nu_I * exp(dual_kp * gap)`` (proportional: an overshoot relaxes the pressure at once).
        With ``dual_lead`` L > 0 [ours] the gap is the one expected ``L * steps`` ahead: E[MACs] plus its
        velocity (averaged over that horizon) times the lead, against the budget due then.  The thetas follow
        nu with a lag (momentum, travel time), so a controller on the present gap keeps winding nu up while
        E[MACs] is already falling towards the budget, and overshoots it; on the predicted gap it lets go
        when the fall will close the gap.
        With ``dual_hold`` [ours] (anti-windup) a negative gap moves the integral only by as much as E[MACs] is
        under the target itself, ``max(gap, min(0, (E - T) / (1 - T)))``: structures that leave ahead of the
        schedule do not unwind the price that the final budget will need (the proportional part still relaxes).
        """
        c = self.cfg
        assert self.target is not None  # budget mode only
        em = torch.as_tensor(self.expected_macs, dtype=torch.float64)
        if c.dual_lead > 0:
            lead = c.dual_lead * max(1, self.total_steps)
            if self.e_prev is not None:
                self.e_vel = self.e_vel + (em - self.e_prev - self.e_vel) / max(1.0, lead)
            self.e_prev = em
            em, step = em + lead * self.e_vel, step + round(lead)
        span = max(1e-6, 1.0 - self.target)
        gap = (em - self.scheduled(step)) / span
        rate = c.dual_gain / (c.theta_travel * max(1, self.total_steps))
        igap = gap
        if c.dual_hold:  # below the schedule, the integral falls only as far as E[MACs] is below the target itself
            igap = torch.where(gap < 0, torch.maximum(gap, ((em - self.target) / span).clamp(max=0.0)), gap)
        self.nu_i = (self.nu_i * torch.exp(rate * igap)).clamp(1e-6, 1e6)
        self.nu = self.nu_i * torch.exp(c.dual_kp * gap.clamp(-5.0, 5.0))
        self.nu_max = torch.maximum(torch.as_tensor(self.nu_max, dtype=torch.float64, device=em.device), self.nu)

    def step_scale(self, kind: str) -> Any:
        """``step_per_nu`` [ours], under a target: the normalised theta gradient of the chosen kinds is
        divided by this, nu (at least ``nu_floor``), so that a structure with importance per cost well
        below nu leaves at the price's full speed whatever nu's scale (under a target nu starts small and
        falls once the budget is met; with speed proportional to nu a useless block could still be at
        theta 0.8 when the budget is due).  The sign of every step, and so every decision, is unchanged;
        only the speed is.  A fixed nu (no target) is the user's own scale of the price: 1."""
        mode = self.cfg.step_per_nu
        if self.target is not None and (mode == "all" or (mode == "layer" and kind == "layer")):
            return torch.as_tensor(self.nu).clamp_min(self.cfg.nu_floor)
        return 1.0

    def values(self) -> dict[str, float]:
        """nu, its integral part, its maximum and E[MACs], read on the host (a sync on a GPU)."""
        return {"nu": float(self.nu), "nu_i": float(self.nu_i), "nu_max": float(self.nu_max),
                "expected_macs": float(self.expected_macs)}

    def state_dict(self) -> dict[str, Any]:
        lead = {} if self.e_prev is None else {"e_prev": float(self.e_prev), "e_vel": float(self.e_vel)}
        return {**self.values(), **lead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nu_max = float(state.get("nu_max", self.nu_max))
        self.nu = float(state.get("nu", self.nu))
        self.nu_i = float(state.get("nu_i", self.nu_i))
        self.expected_macs = float(state.get("expected_macs", 1.0))
        self.e_prev = state.get("e_prev")
        self.e_vel = float(state.get("e_vel", 0.0))
