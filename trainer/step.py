"""One step's maths: every tenant's losses, backward into each tenant's device copy of its LoRA.

Input is what `data.py` gathered (token ids, rewards, logprobs: no I/O here); output is gradients
on the tenants' device weights and each tenant's losses by name. AdamW, checkpoint and publish are
the caller's (`loop.py`). Shapes as in `losses.py`: `N` completion tokens of a pass (flattened
over its rows), `K` samples of one group, `S` sequences (records) of one tenant.

  - on-policy: one shared-prefix pass per group, PPO-clip against the logprobs vLLM sampled with
    (optional KL to the base model), weighted by the group's share of the tenant's tokens;
  - rated production answers: truncated-importance-weighted policy gradient against the serving
    version's logprobs, tenants' rows sharing passes;
  - corrections: SFT, tenants' rows sharing passes; optional DPO against the answer they replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import TenantBatch, multi_tenant_backward, sequence_logprobs, shared_prefix_logprobs
from clora.trainer.lora import LoRAWeights, MultiLoRALinear, Segment, bind
from clora.trainer.losses import (
    dpo_loss,
    group_advantages,
    kl_to_reference,
    off_policy_loss,
    ppo_clip_loss,
    sequence_sums,
    sft_loss,
)

if TYPE_CHECKING:  # types only: this module loads with torch alone
    from clora.trainer.data import TenantData
    from clora.wire.feedback import TrainingRecord

Layers = dict[str, MultiLoRALinear]


def backward(model: nn.Module, layers: Layers, data: list[TenantData], states: dict[str, TenantState],
             pass_tokens: int) -> dict[str, dict[str, float]]:
    """Gradients of every tenant's weighted losses into `states` (device copies); each tenant's
    losses by name, unweighted."""
    losses: dict[str, dict[str, float]] = {d.customer: {} for d in data}
    for d in data:
        if d.groups:
            losses[d.customer]["onpolicy"] = onpolicy_backward(model, layers, d, states[d.customer].weights)

    rated = [d for d in data if d.rated and d.config.weights.offpolicy]
    if rated:
        for d, value in zip(rated, offpolicy_backward(model, layers, rated, states, pass_tokens)):
            losses[d.customer]["offpolicy"] = value

    corrected = [d for d in data if d.corrections and d.config.weights.correction]
    if corrected:
        for d, value in zip(corrected, correction_backward(model, layers, corrected, states, pass_tokens)):
            losses[d.customer]["correction"] = value

    for d in data:
        if d.corrections and d.config.weights.preference:
            losses[d.customer]["preference"] = preference_backward(model, layers, d, states[d.customer].weights)
    return losses


def onpolicy_backward(model: nn.Module, layers: Layers, d: TenantData, weights: LoRAWeights) -> float:
    """GRPO on the tenant's groups: one shared-prefix pass per group."""
    config, device = d.config, model.lm_head.weight.device
    tokens = sum(len(c) for g in d.groups for c in g.completions)
    total = 0.0
    for group in d.groups:
        advantages_K = group_advantages(torch.tensor([group.rewards]))[0].to(device)
        with bind(layers, [Segment(0, len(group.completions), weights)]):
            result = shared_prefix_logprobs(model, group.prompt_token_ids, group.completions)
        logp_N, rows_N = result.logprobs, result.rows
        old_logp_N = torch.tensor([lp for lps in group.logprobs for lp in lps], device=device)
        loss = ppo_clip_loss(logp_N, old_logp_N, advantages_K[rows_N], config.clip)
        if config.kl_coef:
            with torch.no_grad():
                ref_logp_N = shared_prefix_logprobs(model, group.prompt_token_ids, group.completions).logprobs
            loss = loss + config.kl_coef * kl_to_reference(logp_N, ref_logp_N)
        share = sum(len(c) for c in group.completions) / tokens
        (loss * config.weights.onpolicy * share).backward()
        total += float(loss.detach()) * share
    return total


def offpolicy_backward(model: nn.Module, layers: Layers, rated: list[TenantData], states: dict[str, TenantState],
                       pass_tokens: int) -> list[float]:
    """Production answers with a reward: truncated-IS policy gradient, every tenant's rows batched."""
    advantages_S = [centred([r.reward or 0.0 for r in d.rated]) for d in rated]

    def loss_fn(t: int, logp_N: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
        d = rated[t]
        behaviour_logp_N = torch.tensor(row_values(d.rated, rows_N, "behaviour_logprobs"), device=logp_N.device)
        loss = off_policy_loss(logp_N, behaviour_logp_N, advantages_S[t].to(logp_N.device)[rows_N], d.config.is_cap)
        return loss * d.config.weights.offpolicy

    batches = [TenantBatch(states[d.customer].weights, [r.prompt_token_ids for r in d.rated],
                           [r.completion_token_ids for r in d.rated]) for d in rated]
    return multi_tenant_backward(model, layers, batches, loss_fn, pass_tokens)


def correction_backward(model: nn.Module, layers: Layers, corrected: list[TenantData],
                        states: dict[str, TenantState], pass_tokens: int) -> list[float]:
    """Operators' corrections as supervised targets, every tenant's rows batched."""

    def loss_fn(t: int, logp_N: torch.Tensor, _rows_N: torch.Tensor) -> torch.Tensor:
        return sft_loss(logp_N) * corrected[t].config.weights.correction

    batches = [TenantBatch(states[d.customer].weights, [r.prompt_token_ids for r in d.corrections], d.targets)
               for d in corrected]
    return multi_tenant_backward(model, layers, batches, loss_fn, pass_tokens)


def preference_backward(model: nn.Module, layers: Layers, d: TenantData, weights: LoRAWeights) -> float:
    """DPO: the correction over the answer it replaced, against the base model as reference."""
    prompts = [r.prompt_token_ids for r in d.corrections] * 2
    completions = d.targets + [r.completion_token_ids for r in d.corrections]  # chosen rows, then rejected
    n = len(d.corrections)
    with torch.no_grad():
        ref = sequence_logprobs(model, prompts, completions)
    ref_sums = sequence_sums(ref.logprobs, ref.rows, 2 * n)
    with bind(layers, [Segment(0, 2 * n, weights)]):
        result = sequence_logprobs(model, prompts, completions)
    sums = sequence_sums(result.logprobs, result.rows, 2 * n)
    chosen_S, rejected_S, ref_chosen_S, ref_rejected_S = sums[:n], sums[n:], ref_sums[:n], ref_sums[n:]
    loss = dpo_loss(chosen_S, rejected_S, ref_chosen_S, ref_rejected_S, d.config.dpo_beta)
    (loss * d.config.weights.preference).backward()
    return float(loss.detach())


def centred(rewards: list[float]) -> torch.Tensor:
    """Rewards minus their mean (a baseline), unless there is only one."""
    rewards_S = torch.tensor(rewards)
    return rewards_S - rewards_S.mean() if len(rewards) > 1 else rewards_S


def row_values(records: list[TrainingRecord], rows_N: torch.Tensor, attribute: str) -> list[float]:
    """Per-token values of the given rows, in the order the tokens appear."""
    out: list[float] = []
    previous = -1
    for row in rows_N.tolist():
        if row != previous:
            out += getattr(records[row], attribute)
            previous = row
    return out


@torch.no_grad()
def greedy(model: nn.Module, layers: Layers, weights: LoRAWeights, prompt_token_ids: list[int],
           max_new_tokens: int, eos_token_id: int) -> list[int]:
    """The trainer's own greedy completion under a tenant's weights (to compare with the server's)."""
    device = model.lm_head.weight.device
    out: list[int] = []
    ids = torch.tensor([prompt_token_ids], device=device)
    cache = None
    with bind(layers, [Segment(0, 1, weights)]):
        for _ in range(max_new_tokens):
            result = model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            if token == eos_token_id:
                break
            ids = torch.tensor([[token]], device=device)
    return out
