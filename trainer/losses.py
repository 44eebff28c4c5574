"""The maths of every learning signal, as pure functions on flat per-token tensors.

Shapes: `N` completion tokens of a batch (flattened over sequences), `G` groups of `K` samples.
Every loss is a mean over the tokens it covers, so batch composition does not change its scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards_G_K: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward against its group's mean, in units of the group's spread.
    A group whose samples all scored the same teaches nothing: zeros."""
    mean = rewards_G_K.mean(dim=-1, keepdim=True)
    std = rewards_G_K.std(dim=-1, unbiased=False, keepdim=True)
    constant = (rewards_G_K == rewards_G_K[..., :1]).all(dim=-1, keepdim=True)  # exactly 0, not float noise
    return torch.where(constant, 0.0, (rewards_G_K - mean) / (std + eps))


def ppo_clip_loss(logp_N: torch.Tensor, old_logp_N: torch.Tensor, advantages_N: torch.Tensor,
                  clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate against the sampling policy's logprobs (vLLM's, for on-policy)."""
    ratio = torch.exp(logp_N - old_logp_N)
    surrogate = torch.minimum(ratio * advantages_N, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages_N)
    return -surrogate.mean()


def truncated_importance_weights(logp_N: torch.Tensor, behaviour_logp_N: torch.Tensor,
                                 cap: float = 2.0) -> torch.Tensor:
    """min(pi/mu, cap) per token, no gradient: corrects for production data sampled by an older
    adapter version, without the variance of unbounded ratios."""
    return torch.exp(logp_N.detach() - behaviour_logp_N).clamp(max=cap)


def off_policy_loss(logp_N: torch.Tensor, behaviour_logp_N: torch.Tensor, advantages_N: torch.Tensor,
                    cap: float = 2.0) -> torch.Tensor:
    """Policy gradient on logged production samples, importance-weighted (truncated) per token.
    A token the policy can no longer sample (logprob -inf: outside its top-p set) has weight 0."""
    weights = truncated_importance_weights(logp_N, behaviour_logp_N, cap)
    return -(weights * advantages_N * finite_or_zero(logp_N)).mean()


def policy_gradient_loss(logp_N: torch.Tensor, advantages_N: torch.Tensor) -> torch.Tensor:
    """REINFORCE, -A log p per token: for GRPO groups the trainer cannot take a ratio for
    (grammar-constrained tool calls). On-policy with one update per batch it is PPO's gradient
    (ratio 1). Its group-normalised advantages sum to zero, so a token every episode of a group
    shares (the call's JSON scaffolding, a number all of them copied right) gets no net push;
    the unlikelihood of `ratio_free_loss` would push such a near-certain token down by
    p / (1 - p) times more than the likelihood side pushes it up, and training collapses."""
    return -(advantages_N * logp_N).mean()


def ratio_free_loss(logp_N: torch.Tensor, advantages_N: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """For answers whose sampling the trainer cannot reproduce (greedy, grammar-constrained,
    penalised): no importance ratio. Positive advantage: advantage-weighted likelihood (SFT on the
    answer). Negative: advantage-weighted unlikelihood, -log(1 - p) per token, whose gradient
    vanishes as p -> 0: it pushes a bad answer down and then stops, where -log p would push forever."""
    up_N, down_N = advantages_N.clamp(min=0), (-advantages_N).clamp(min=0)
    unlikelihood_N = -torch.log1p(-logp_N.exp().clamp(max=1 - floor))
    return (-up_N * logp_N + down_N * unlikelihood_N).mean()


def finite_or_zero(logp_N: torch.Tensor) -> torch.Tensor:
    """-inf logprobs (tokens outside the sampler's kept set) as 0, with no gradient through them."""
    return torch.where(torch.isfinite(logp_N), logp_N, torch.zeros_like(logp_N))


def kl_to_reference(logp_N: torch.Tensor, ref_logp_N: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) penalty on tokens the policy sampled, as the k2 estimator (log pi - log ref)^2 / 2.

    What matters in a loss is the gradient: averaged over the policy's samples, k2's gradient,
    (log pi - log ref) grad log pi, is exactly the gradient of KL(pi || ref). Schulman's k3
    (r - log r - 1, r = ref/pi) estimates KL(pi || ref)'s *value* without bias, but its gradient,
    (1 - r) grad log pi, averages to the gradient of KL(ref || pi) (tests/test_losses.py)."""
    return (0.5 * (logp_N - ref_logp_N) ** 2).mean()


def sft_loss(logp_N: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of a target (an operator's correction)."""
    return -logp_N.mean()


def sequence_sums(values_N: torch.Tensor, rows_N: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-sequence sums of per-token values."""
    return torch.zeros(rows, dtype=values_N.dtype, device=values_N.device).index_add(0, rows_N, values_N)


def dpo_loss(chosen_S: torch.Tensor, rejected_S: torch.Tensor, ref_chosen_S: torch.Tensor,
             ref_rejected_S: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO on sequence logprob sums: prefer the correction over the answer it replaced."""
    margin = (chosen_S - ref_chosen_S) - (rejected_S - ref_rejected_S)
    return -F.logsigmoid(beta * margin).mean()
