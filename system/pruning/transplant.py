"""Optimizer-state transplant after surgery (pure: builds a new optimizer, touches no I/O).

Every per-parameter state tensor shaped like its parameter (SGD ``momentum_buffer``, Adam
``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``) is index-selected with the same slices as the
parameter; scalars (Adam's ``step``) are copied; state of removed parameters disappears.
Parameter groups keep their hyper-parameters and their membership (by parameter name).

Example::

    small, spec, slices = apply_plan(model, plan)
    opt = transplant_optimizer(opt, model, small, slices)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from system.pruning.surgery import Slices, select


def transplant_state(state_by_name: dict[str, dict[str, Any]], shapes: dict[str, torch.Size],
                     new_names: set[str], slices: Slices) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state keyed by name -> the same for the pruned model.

    ``shapes``: old parameter shapes (to tell per-element tensors from scalars).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, st in state_by_name.items():
        if name not in new_names:
            continue
        new_st = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == shapes[name] and v.dim() > 0:
                new_st[k] = select(v, slices.get(name))
            elif isinstance(v, torch.Tensor):
                new_st[k] = v.detach().clone()
            else:
                new_st[k] = v
        out[name] = new_st
    return out


def transplant_optimizer(opt: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module,
                         slices: Slices) -> torch.optim.Optimizer:
    """A new optimizer of the same class over ``new_model`` carrying the surviving state."""
    old_names = {id(p): n for n, p in old_model.named_parameters()}
    new_params = dict(new_model.named_parameters())
    groups = []
    for g in opt.param_groups:
        names = [old_names[id(p)] for p in g["params"]]
        keep = [n for n in names if n in new_params]
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [new_params[n] for n in keep]})
    # every group carries its full hyper-parameters; only ``lr`` may be a required argument
    kwargs = {"lr": opt.defaults["lr"]} if "lr" in opt.defaults else {}
    new_opt = type(opt)(groups, **kwargs)
    new_opt.defaults = dict(opt.defaults)
    by_name = {old_names[id(p)]: st for p, st in opt.state.items() if id(p) in old_names}
    shapes = {n: p.shape for n, p in old_model.named_parameters()}
    for name, st in transplant_state(by_name, shapes, set(new_params), slices).items():
        new_opt.state[new_params[name]] = st
    return new_opt
