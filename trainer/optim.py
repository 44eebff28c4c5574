"""AdamW on one tenant's device state (torch's own functional AdamW over the store's tensors)."""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from clora.trainer.adapter_store import TenantState


def adamw_step(state: TenantState, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> float:
    """Clip, update in place, clear gradients; returns the gradient norm before clipping.

    A step whose losses reached none of the tenant's weights (every group's rewards equal: no
    advantage, no rated answer or correction) leaves weights and moments as they are: AdamW's
    momentum alone would still move the adapter by nearly the full learning rate, step after step
    (two such steps in a row took tenants that answered every problem to 0.06 and 0.5,
    BENCHMARKS.md). It still counts as a step (`state.step`: its version is published), not as an
    AdamW update (`state.adam_steps`, the bias correction's count)."""
    params = state.weights.tensors()
    state.step += 1
    if all(p.grad is None or not p.grad.any() for p in params):
        for p in params:
            p.grad = None
        return 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    steps = [torch.tensor(float(state.adam_steps)) for _ in params]  # adamw increments these itself
    with torch.no_grad():
        adamw(params, [p.grad for p in params], state.exp_avg, state.exp_avg_sq, [], steps, amsgrad=False,
              beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
    state.adam_steps += 1
    for p in params:
        p.grad = None
    return float(norm)
