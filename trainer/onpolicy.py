"""On-policy GRPO: every tenant's groups (and episodes' later turns) in shared-prefix passes, PPO-clip
against the logprobs vLLM sampled with, REINFORCE for grammar-constrained turns, optional KL to the
base model; a lagged tenant's groups corrected as off-policy by one version (see step.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import PrefixGroup, shared_prefix_logprobs
from clora.trainer.lora import Layers, LoRAWeights
from clora.trainer.losses import group_advantages, kl_to_reference, policy_gradient_loss, ppo_clip_loss
from clora.trainer.packing import pack_groups
from clora.trainer.results import Gap, TenantResult

if TYPE_CHECKING:  # types only: this module loads with torch alone
    from clora.trainer.data import TenantData
    from clora.trainer.rollouts import Group

# A group (its prompt run once for all its rows) may take this many times `pass_tokens` in one pass
# before its rows are split across passes: sharing the prompt saves more than small passes gain,
# but the pass's memory must stay bounded.
GROUP_PASS_FACTOR = 4


@dataclass
class OnPolicyRows:
    """One pass item of a tenant's on-policy data: a prompt and completions sampled from it, with
    each completion's advantage and the server's logprobs of its tokens."""

    tenant: int
    group: PrefixGroup
    advantages_R: torch.Tensor
    old_logprobs: list[float]  # flat, completion by completion
    constrained: bool  # sampled under a grammar (a forced tool call): vLLM's logprobs are not comparable

    def split(self, max_tokens: int) -> list[OnPolicyRows]:
        """These rows in parts whose padded size (prompt + rows x widest row) stays within
        max_tokens, one row at least: a pass's activation memory grows with its padded size (a
        group of long multi-turn rows over a long prompt took 20 GB in one pass), and each part
        runs the prompt again."""
        g, parts, start = self.group, [], 0
        widths = [len(r) for r in g.rows()]
        while start < len(widths):
            stop = start + 1
            while stop < len(widths) and len(g.prompt) + (stop + 1 - start) * max(widths[start:stop + 1]) <= max_tokens:
                stop += 1
            parts.append((start, stop))
            start = stop
        if len(parts) == 1:
            return [self]
        offsets = [0]
        for c in g.completions:
            offsets.append(offsets[-1] + len(c))
        return [OnPolicyRows(self.tenant, replace(g, completions=g.completions[a:b],
                                                  contexts=g.contexts[a:b] if g.contexts is not None else None),
                             self.advantages_R[a:b], self.old_logprobs[offsets[a]:offsets[b]], self.constrained)
                for a, b in parts]


def onpolicy_rows(t: int, group: Group, weights: LoRAWeights) -> list[OnPolicyRows]:
    """A group's pass items: its completions over the shared prompt, and each later turn of a
    multi-turn episode (the conversation so far, tool results included) with its episode's
    advantage. A later turn whose prompt extends the group's prompt (the server renders the same
    conversation the same way) is a row of the group: the tokens between are its unscored context,
    so the long shared prompt (system, tools schema, question) runs once for every turn; any other
    turn is an item of its own over its whole prompt. Only the model's own tokens are scored."""
    advantages_K = group_advantages(torch.tensor([group.rewards]))[0]
    constrained = group.sampler is not None and group.sampler.constrained
    prompt, n = group.prompt_token_ids, len(group.prompt_token_ids)
    completions, contexts = list(group.completions), [[] for _ in group.completions]
    old_logprobs, advantages = [list(lps) for lps in group.logprobs], list(range(len(group.completions)))
    alone: list[OnPolicyRows] = []
    for k, turns in enumerate(group.later):
        for turn in turns:
            if turn.prompt_token_ids[:n] == prompt and len(turn.prompt_token_ids) > n:
                completions.append(turn.token_ids)
                contexts.append(turn.prompt_token_ids[n:])
                old_logprobs.append(list(turn.logprobs))
                advantages.append(k)
            else:
                alone.append(OnPolicyRows(t, PrefixGroup(turn.prompt_token_ids, [turn.token_ids], weights,
                                                         group.sampler), advantages_K[k:k + 1],
                                          list(turn.logprobs), constrained))
    shared = PrefixGroup(prompt, completions, weights, group.sampler,
                         contexts if any(contexts) else None)
    return [OnPolicyRows(t, shared, advantages_K[advantages], [lp for lps in old_logprobs for lp in lps],
                         constrained)] + alone


def onpolicy_backward(model: nn.Module, layers: Layers, sampled: list[TenantData], states: dict[str, TenantState],
                      pass_tokens: int, results: list[TenantResult]) -> list[float]:
    """GRPO on every tenant's groups (and episodes' later turns), several tenants sharing
    shared-prefix passes. A tenant's loss is a token mean over all its sampled tokens: each pass
    adds its tokens' part, weighted by their share, so the gradients are those of one pass per
    group. Turns sampled under a grammar take the ratio-free loss (the trainer cannot rebuild the
    grammar's mask, so no importance ratio against vLLM's masked logprobs) and no logprob gap.
    Groups whose episodes all scored the same (advantage 0: no gradient from PPO or the ratio-free
    loss) take no pass unless the tenant has a KL term; their tokens still count in the tenant's
    token mean, so the gradients are those of passing them. A lagged tenant's constrained turns
    take PPO against the trainer's logprobs under the weights that sampled them (`behaviour_pass`):
    REINFORCE would treat the previous version's samples as the current one's. Returns each
    tenant's loss."""
    items, group_of = [], []  # group_of[i]: (tenant, group) of items[i]
    for t, d in enumerate(sampled):
        for g_index, g in enumerate(d.groups):
            for row in onpolicy_rows(t, g, states[d.customer].weights):
                parts = row.split(GROUP_PASS_FACTOR * pass_tokens)
                items += parts
                group_of += [(t, g_index)] * len(parts)
    lagged = [d.behaviour is not None for d in sampled]
    device = model.lm_head.weight.device
    behaviour = {t: d.behaviour.copy(device) for t, d in enumerate(sampled) if d.behaviour is not None}
    totals = [0] * len(sampled)
    for item in items:
        totals[item.tenant] += item.group.tokens()
    taught = [i for i, item in enumerate(items) if item.advantages_R.any() or sampled[item.tenant].config.kl_coef]
    teaching = [items[i] for i in taught]
    for t, _ in {group_of[i] for i in taught}:
        results[t].taught_groups += 1
    losses = [0.0] * len(sampled)
    for chosen in pack_groups([item.group for item in teaching], pass_tokens):
        passed = [teaching[i] for i in chosen]
        with_kl = any(sampled[item.tenant].config.kl_coef for item in passed)
        result = shared_prefix_logprobs(model, layers, [item.group for item in passed], with_raw=with_kl)
        sampled_logp_N = behaviour_pass(model, layers, passed, behaviour) \
            if any(item.constrained and item.tenant in behaviour for item in passed) else None
        if with_kl:  # the base model's (unprocessed) logprobs of the same tokens
            with torch.no_grad():
                ref_logp_N = shared_prefix_logprobs(model, layers, [replace(item.group, weights=None, sampler=None)
                                                                    for item in passed]).logprobs
        tenant_R = torch.tensor([item.tenant for item in passed for _ in item.group.completions], device=device)
        constrained_R = torch.tensor([item.constrained for item in passed for _ in item.group.completions],
                                     device=device)
        advantages_R = torch.cat([item.advantages_R for item in passed]).to(device)
        old_logp_N = torch.tensor([lp for item in passed for lp in item.old_logprobs], device=device)
        logp_N, tenant_N, rows_N = result.logprobs, tenant_R[result.rows], result.rows
        total = logp_N.new_zeros(())
        for t in sorted(set(tenant_R.tolist())):
            config, mine = sampled[t].config, tenant_N == t
            free, ratio = mine & constrained_R[rows_N], mine & ~constrained_R[rows_N]
            if not lagged[t]:
                results[t].gap.add(logp_N[ratio], old_logp_N[ratio])
            loss = logp_N.new_zeros(())
            if ratio.any():
                loss = loss + ppo_clip_loss(logp_N[ratio], old_logp_N[ratio], advantages_R[rows_N[ratio]],
                                            config.clip) * (ratio.sum() / mine.sum())
            if free.any() and lagged[t]:
                loss = loss + ppo_clip_loss(logp_N[free], sampled_logp_N[free], advantages_R[rows_N[free]],
                                            config.clip) * (free.sum() / mine.sum())
            elif free.any():
                loss = loss + policy_gradient_loss(logp_N[free], advantages_R[rows_N[free]]) * (free.sum() / mine.sum())
            if config.kl_coef:
                loss = loss + config.kl_coef * kl_to_reference(result.raw_logprobs[mine], ref_logp_N[mine])
            loss = loss * (mine.sum() / totals[t])
            losses[t] += float(loss.detach())
            total = total + loss * config.weights.onpolicy
        total.backward()
    for t, d in enumerate(sampled):
        mine = [item for item in items if item.tenant == t]
        if lagged[t]:
            results[t].lagged_groups = len(d.groups)
            sampled_gap(model, layers, mine, behaviour[t], results[t].gap)
        elif results[t].gap.tokens == 0:  # no group taught anything: the gap is still checked, on one
            sampled_gap(model, layers, mine, states[d.customer].weights, results[t].gap)
    return losses


@torch.no_grad()
def behaviour_pass(model: nn.Module, layers: Layers, passed: list[OnPolicyRows],
                   behaviour: dict[int, LoRAWeights]) -> torch.Tensor:
    """The pass's tokens' logprobs (in the pass's order) under the weights that sampled them: a
    lagged tenant's previous weights; the others' current ones (values unused)."""
    groups = [replace(item.group, weights=behaviour.get(item.tenant, item.group.weights)) for item in passed]
    return shared_prefix_logprobs(model, layers, groups).logprobs


@torch.no_grad()
def sampled_gap(model: nn.Module, layers: Layers, items: list[OnPolicyRows], weights: LoRAWeights, gap: Gap) -> None:
    """The logprob gap of a tenant's groups against the weights that sampled them (a lagged
    tenant's previous ones; its current ones when no group took a pass): over its first group
    whose logprobs vLLM's are comparable to (not grammar-constrained)."""
    item = next((item for item in items if not item.constrained), None)
    if item is None:
        return
    result = shared_prefix_logprobs(model, layers, [replace(item.group, weights=weights)])
    gap.add(result.logprobs, torch.tensor(item.old_logprobs, device=result.logprobs.device))
