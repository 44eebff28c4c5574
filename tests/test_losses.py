"""Every loss and the optimizer against values computed by hand (or by torch's own AdamW)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from clora.trainer.adapter_store import TenantState
from clora.trainer.lora import LoRASpec, LoRAWeights
from clora.trainer.losses import (
    dpo_loss,
    group_advantages,
    kl_to_reference,
    off_policy_loss,
    policy_gradient_loss,
    ratio_free_loss,
    truncated_importance_weights,
)
from clora.trainer.optim import adamw_step


def test_truncation_cap_bounds_the_importance_weight_and_passes_no_gradient_through_it():
    logp_N = torch.tensor([math.log(0.9), math.log(0.2)], requires_grad=True)
    behaviour_N = torch.tensor([math.log(0.3), math.log(0.4)])
    weights = truncated_importance_weights(logp_N, behaviour_N, cap=2.0)
    assert torch.allclose(weights, torch.tensor([2.0, 0.5]))  # 0.9/0.3 = 3 capped at 2; 0.2/0.4
    assert not weights.requires_grad
    advantages_N = torch.tensor([1.0, -1.0])
    loss = off_policy_loss(logp_N, behaviour_N, advantages_N, cap=2.0)
    loss.backward()
    # -(w * A * logp).mean(): d/dlogp = -w * A / N with the weight held constant
    assert torch.allclose(logp_N.grad, torch.tensor([-2.0 * 1.0 / 2, -0.5 * -1.0 / 2]))
    assert loss.item() == pytest.approx(-(2.0 * math.log(0.9) - 0.5 * math.log(0.2)) / 2)


def test_kl_gradient_is_that_of_kl_policy_to_reference():
    """Averaged over the policy's own samples, the estimator's gradient must equal the gradient of
    KL(pi || ref) = sum_x pi(x) (log pi(x) - log ref(x)); k3 used as a loss gives KL(ref || pi)'s."""
    theta = torch.tensor([0.3, -0.2, 1.1, 0.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.4, 0.9]), dim=0)

    logp = torch.log_softmax(theta, dim=0)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)

    logp = torch.log_softmax(theta, dim=0)
    pi = logp.exp().detach()  # the sampling distribution (no gradient through the sampling)
    per_sample = torch.stack([kl_to_reference(logp[x:x + 1], ref[x:x + 1]) for x in range(4)])
    (estimated,) = torch.autograd.grad((pi * per_sample).sum(), theta)
    assert torch.allclose(estimated, exact, atol=1e-6), (estimated, exact)


def test_kl_value_and_gradient_by_hand():
    logp_N = torch.tensor([math.log(0.5)], requires_grad=True)
    ref_N = torch.tensor([math.log(0.25)])
    loss = kl_to_reference(logp_N, ref_N)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.log(2) ** 2)  # k2: (log pi - log ref)^2 / 2
    assert logp_N.grad.item() == pytest.approx(math.log(2))  # pushes log pi down towards log ref


def test_dpo_prefers_the_chosen_answer():
    chosen_S = torch.tensor([-1.0], requires_grad=True)
    rejected_S = torch.tensor([-3.0], requires_grad=True)
    loss = dpo_loss(chosen_S, rejected_S, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.backward()
    margin = (-1.0 - -2.0) - (-3.0 - -2.0)  # 2: the policy already favours the chosen answer
    sigmoid = 1 / (1 + math.exp(-0.1 * margin))
    assert loss.item() == pytest.approx(-math.log(sigmoid))
    assert chosen_S.grad.item() == pytest.approx(-0.1 * (1 - sigmoid))  # descent raises the chosen answer
    assert rejected_S.grad.item() == pytest.approx(0.1 * (1 - sigmoid))  # and lowers the rejected one


def test_adamw_step_equals_torch_optim_adamw():
    torch.manual_seed(0)
    a = {"m": torch.randn(4, 8)}
    b = {"m": torch.randn(6, 4)}
    weights = LoRAWeights(LoRASpec(rank=4, alpha=8, targets=("m",)), a, b)
    state = TenantState("t", weights, [torch.zeros_like(t) for t in weights.tensors()],
                        [torch.zeros_like(t) for t in weights.tensors()], rng=random.Random(0))
    reference = [t.clone().requires_grad_(True) for t in weights.tensors()]
    optimizer = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step in range(5):
        grads = [torch.randn_like(t) * (3.0 if step == 2 else 0.1) for t in reference]  # step 2 gets clipped
        for p, g in zip(weights.tensors(), grads):
            p.grad = g.clone()
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(reference, 1.0)
        optimizer.step()
        adamw_step(state, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)
    for mine, theirs in zip(weights.tensors(), reference):
        assert torch.allclose(mine, theirs.detach(), atol=1e-6)
    assert state.step == 5


def test_a_step_without_gradient_leaves_the_adapter_and_adamw_as_they_were():
    """Every group's rewards equal (the tenant already answers every problem): no loss reaches the
    weights. AdamW's momentum alone would move them nearly a full step each time (0.85 and 0.73 of
    one after four consistent updates); such steps change nothing and the next real update is
    exactly the one torch's AdamW makes having never seen them."""
    torch.manual_seed(0)
    weights = LoRAWeights(LoRASpec(rank=4, alpha=8, targets=("m",)), {"m": torch.randn(4, 8)}, {"m": torch.randn(6, 4)})
    state = TenantState("t", weights, [torch.zeros_like(t) for t in weights.tensors()],
                        [torch.zeros_like(t) for t in weights.tensors()], rng=random.Random(0))
    reference = [t.clone().requires_grad_(True) for t in weights.tensors()]
    optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.0)
    grads = [torch.randn_like(t) * 0.1 for t in reference]

    def real_step() -> None:
        for p, theirs, g in zip(weights.tensors(), reference, grads):
            p.grad, theirs.grad = g.clone(), g.clone()
        optimizer.step()
        adamw_step(state, lr=1e-2)

    for _ in range(4):
        real_step()
    before = [t.clone() for t in state.tensors()]
    adamw_step(state, lr=1e-2)  # no gradient at all (the backward skipped every group)
    for p in weights.tensors():
        p.grad = torch.zeros_like(p)  # or gradients that are all zero
    adamw_step(state, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))  # weights and both moments
    assert all(p.grad is None for p in weights.tensors())
    assert (state.step, state.adam_steps) == (6, 4)
    real_step()
    for mine, theirs in zip(weights.tensors(), reference):
        assert torch.allclose(mine, theirs.detach(), atol=1e-6)
    assert (state.step, state.adam_steps) == (7, 5)


def test_a_token_every_episode_of_a_group_shares_gets_no_net_push_from_the_grpo_loss():
    """Constrained tool calls train without a ratio. Four episodes, one rewarded, all sharing a
    near-certain token (the call's JSON scaffolding): REINFORCE's zero-sum advantages leave its
    logit still; unlikelihood on the three failures would push it down hard (the collapse seen on
    SmolLM2: sampled reward 0.31 -> 0.00 in 6 steps at lr 1e-3)."""
    logits = torch.tensor([6.0, 0.0, 0.0], requires_grad=True)  # p(shared token) ~ 0.995
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]
    assert advantages.sum().abs() < 1e-6

    def push(loss_fn) -> float:
        logits.grad = None
        logp = torch.log_softmax(logits, -1)[0].expand(4)  # the same token in each episode
        loss_fn(logp, advantages).backward()
        return float(-logits.grad[0])  # > 0: the step raises the shared token
    assert push(policy_gradient_loss) == pytest.approx(0.0, abs=1e-6)
    assert push(ratio_free_loss) < -0.2  # what the constrained groups trained with before: a hard push down
