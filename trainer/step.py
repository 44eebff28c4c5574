"""One step's maths: every tenant's losses, backward into each tenant's device copy of its LoRA.

Input is what `data.py` gathered (token ids, rewards, logprobs, samplers: no I/O here); output is
gradients on the tenants' device weights and, per tenant, its losses by name, how many rated
records took each path, and the logprob gap. AdamW, checkpoint and publish are the caller's
(`loop.py`). Shapes as in `losses.py`: `N` completion tokens of a pass (flattened over its rows),
`K` samples of one group, `S` sequences (records) of one tenant.

  - on-policy: GRPO groups of every tenant in shared-prefix passes (each prompt run once for its
    K completions, several groups and tenants per pass), PPO-clip against the logprobs vLLM sampled with
    (REINFORCE where sampling was grammar-constrained: `policy_gradient_loss`),
    the trainer's logprobs under the same sampler processing (temperature, top-k, top-p: see
    sampling.py); optional KL to the base model on the unprocessed distributions;
  - rated production answers, advantage = reward - the tenant's running mean of rewards (so
    thumbs-up alone teaches, and thumbs-down alone), tenants' rows sharing passes, by path:
      `importance`: answers sampled by a sampler the trainer reproduces: truncated-importance-
        weighted policy gradient against the serving version's processed logprobs;
      `ratio_free`: greedy, grammar-constrained, penalised or biased answers (or captured before
        the sampler was recorded): no ratio to take; advantage-weighted likelihood / unlikelihood;
  - corrections: SFT, tenants' rows sharing passes; optional DPO against the answer they replaced.

The logprob gap is |trainer logprob - vLLM's| on tokens the trainer's current weights sampled
(on-policy groups; `importance` records of the version it holds), before the update: the
rollout/train mismatch; the loop skips a tenant's step when its mean is above the tenant's bound.
Groups sampled ahead by the previous version (a pipelined rollout: `TenantData.behaviour`) are
off-policy by one step: PPO's ratio is against the logprobs vLLM sampled them with, which is the
importance correction they need, and their gap is measured against the weights that sampled
them, in an extra no-grad pass over the tenant's first group (a sample of its tokens). Their
grammar-constrained turns have no comparable vLLM logprobs, so their ratio is the trainer's own:
the same tokens under the weights that sampled them, in a no-grad pass (unmasked on both sides:
the grammar's renormalisation, the same set of allowed tokens for both versions, is left out of
the ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import (
    PrefixGroup,
    TenantBatch,
    multi_tenant_backward,
    pack_groups,
    sequence_logprobs,
    shared_prefix_logprobs,
)
from clora.trainer.lora import LoRAWeights, MultiLoRALinear, Segment, bind
from clora.trainer.losses import (
    dpo_loss,
    group_advantages,
    kl_to_reference,
    off_policy_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    ratio_free_loss,
    sequence_sums,
    sft_loss,
)

if TYPE_CHECKING:  # types only: this module loads with torch alone
    from clora.trainer.data import Group, TenantData
    from clora.wire.feedback import TrainingRecord

Layers = dict[str, MultiLoRALinear]
IMPORTANCE, RATIO_FREE, CORRECTION = "importance", "ratio_free", "correction"  # loss paths of records
# A group (its prompt run once for all its rows) may take this many times `pass_tokens` in one pass
# before its rows are split across passes: sharing the prompt saves more than small passes gain,
# but the pass's memory must stay bounded.
GROUP_PASS_FACTOR = 4


@dataclass
class Gap:
    """|trainer logprob - vLLM logprob| over the tokens compared."""

    tokens: int = 0
    total: float = 0.0
    max: float = 0.0
    outside: int = 0  # tokens vLLM sampled that the trainer's top-k/top-p set excludes (not in the mean)
    # Per rated record (its index in `TenantData.rated`): (total, tokens), so that a step over the
    # bound can tell which records pushed it there (they are quarantined, the others kept).
    records: dict[int, tuple[float, int]] = field(default_factory=dict)

    def add(self, trainer_N: torch.Tensor, served_N: torch.Tensor, rows_N: torch.Tensor | None = None) -> None:
        """`rows_N`: each token's rated record, when the tokens are records' (not on-policy groups')."""
        trainer_N, served_N = trainer_N.detach().float().cpu(), served_N.detach().float().cpu()
        finite = torch.isfinite(trainer_N) & torch.isfinite(served_N)
        diff = (trainer_N[finite] - served_N[finite]).abs()
        self.outside += int((~finite).sum())
        if diff.numel():
            self.tokens += diff.numel()
            self.total += float(diff.sum())
            self.max = max(self.max, float(diff.max()))
            if rows_N is not None:
                rows = rows_N.detach().cpu()[finite]
                for row in rows.unique().tolist():
                    total, tokens = self.records.get(row, (0.0, 0))
                    mine = diff[rows == row]
                    self.records[row] = (total + float(mine.sum()), tokens + mine.numel())

    @property
    def mean(self) -> float | None:
        return self.total / self.tokens if self.tokens else None

    def records_over(self, bound: float) -> list[int]:
        """The rated records whose own mean gap is above `bound` (indices into `TenantData.rated`)."""
        return sorted(row for row, (total, tokens) in self.records.items() if total / tokens > bound)


@dataclass
class TenantResult:
    """What a step's backward learnt of one tenant."""

    losses: dict[str, float] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)  # records per loss path: importance, ratio_free, correction
    gap: Gap = field(default_factory=Gap)
    lagged_groups: int = 0  # on-policy groups sampled by the previous version (pipelined), corrected as off-policy
    taught_groups: int = 0  # on-policy groups that took a gradient pass (episodes that all scored alike take none)


def backward(model: nn.Module, layers: Layers, data: list[TenantData], states: dict[str, TenantState],
             pass_tokens: int) -> dict[str, TenantResult]:
    """Gradients of every tenant's weighted losses into `states` (device copies); per tenant its
    losses by name (unweighted), its records per path and its logprob gap."""
    results = {d.customer: TenantResult() for d in data}
    sampled = [d for d in data if d.groups]
    if sampled:
        values = onpolicy_backward(model, layers, sampled, states, pass_tokens, [results[d.customer] for d in sampled])
        for d, value in zip(sampled, values):
            results[d.customer].losses["onpolicy"] = value

    rated = [d for d in data if d.rated and d.config.weights.offpolicy]
    if rated:
        values = offpolicy_backward(model, layers, rated, states, pass_tokens, [results[d.customer] for d in rated])
        for d, value in zip(rated, values):
            results[d.customer].losses["offpolicy"] = value

    corrected = [d for d in data if d.corrections and d.config.weights.correction]
    if corrected:
        for d, value in zip(corrected, correction_backward(model, layers, corrected, states, pass_tokens)):
            results[d.customer].losses["correction"] = value
            results[d.customer].paths[CORRECTION] = len(d.corrections)

    for d in data:
        if d.corrections and d.config.weights.preference:
            results[d.customer].losses["preference"] = preference_backward(model, layers, d,
                                                                           states[d.customer].weights)
    return results


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
    return shared_prefix_logprobs(model, layers, [replace(item.group, weights=behaviour.get(item.tenant, item.group.weights))
                                                  for item in passed]).logprobs


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


def rated_path(record: TrainingRecord) -> str:
    """`importance` if the trainer can recompute the distribution the answer was sampled from."""
    sampler = record.interaction.sampler
    return IMPORTANCE if sampler is not None and sampler.reproducible() else RATIO_FREE


def offpolicy_backward(model: nn.Module, layers: Layers, rated: list[TenantData], states: dict[str, TenantState],
                       pass_tokens: int, results: list[TenantResult]) -> list[float]:
    """Production answers with a reward, every tenant's rows batched: each row by its path."""
    advantages_S = [torch.tensor([(r.reward or 0.0) - d.baseline for r in d.rated]) for d in rated]
    paths = [[rated_path(r) for r in d.rated] for d in rated]
    for result, tenant_paths in zip(results, paths):
        for path in tenant_paths:
            result.paths[path] = result.paths.get(path, 0) + 1

    def loss_fn(t: int, logp_N: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
        d, device = rated[t], logp_N.device
        behaviour_logp_N = torch.tensor(row_values(d.rated, rows_N, "behaviour_logprobs"), device=device)
        advantages_N = advantages_S[t].to(device)[rows_N]
        importance_N = torch.tensor([paths[t][r] == IMPORTANCE for r in rows_N.tolist()], device=device)
        current_N = torch.tensor([d.current[r] for r in rows_N.tolist()], device=device) & importance_N
        results[t].gap.add(logp_N[current_N], behaviour_logp_N[current_N], rows_N[current_N])
        # Each path's loss is a mean over its tokens; their sum, weighted by token shares, is the mean over all.
        loss = logp_N.new_zeros(())
        for mask, path_loss in ((importance_N, lambda m: off_policy_loss(logp_N[m], behaviour_logp_N[m],
                                                                           advantages_N[m], d.config.is_cap)),
                                (~importance_N, lambda m: ratio_free_loss(logp_N[m], advantages_N[m]))):
            if mask.any():
                loss = loss + path_loss(mask) * (mask.sum() / mask.numel())
        return loss * d.config.weights.offpolicy

    batches = [TenantBatch(states[d.customer].weights, [r.prompt_token_ids for r in d.rated],
                           [r.completion_token_ids for r in d.rated],
                           [r.interaction.sampler if p == IMPORTANCE else None for r, p in zip(d.rated, tenant_paths)])
               for d, tenant_paths in zip(rated, paths)]
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
