"""AdamW on one tenant's device state (torch's own functional AdamW over the store's tensors)."""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from clora.trainer.adapter_store import TenantState


def adamw_step(state: TenantState, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> float:
    """Clip, update in place, clear gradients; returns the gradient norm before clipping."""
    params = state.weights.tensors()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    steps = [torch.tensor(float(state.step)) for _ in params]  # adamw increments these itself
    with torch.no_grad():
        adamw(params, [p.grad for p in params], state.exp_avg, state.exp_avg_sq, [], steps, amsgrad=False,
              beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
    state.step += 1
    for p in params:
        p.grad = None
    return float(norm)
