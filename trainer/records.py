"""Production records: rated answers and operators' corrections, every tenant's rows batched. Each
record takes one loss path (`rated_path`), each path one loss (`path_loss`, a table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import TenantBatch, multi_tenant_backward, sequence_logprobs
from clora.trainer.lora import Layers, LoRAWeights, Segment, bind
from clora.trainer.losses import dpo_loss, off_policy_loss, ratio_free_loss, sequence_sums, sft_loss
from clora.trainer.results import TenantResult
from clora.wire.trainer_config import TenantConfig

if TYPE_CHECKING:  # types only: this module loads with torch alone
    from clora.trainer.data import TenantData
    from clora.wire.feedback import TrainingRecord

IMPORTANCE, RATIO_FREE, CORRECTION = "importance", "ratio_free", "correction"  # loss paths of records


def rated_path(record: TrainingRecord) -> str:
    """`importance` if the trainer can recompute the distribution the answer was sampled from."""
    sampler = record.interaction.sampler
    return IMPORTANCE if sampler is not None and sampler.reproducible() else RATIO_FREE


@dataclass
class PathTokens:
    """One tenant's tokens on one loss path: the trainer's logprobs, and what the path's loss reads."""

    logp_N: torch.Tensor
    behaviour_logp_N: torch.Tensor | None = None  # the serving version's processed logprobs
    advantages_N: torch.Tensor | None = None


# Each record path's loss, a token mean: rated answers the trainer can reproduce the sampler of
# take the truncated-importance-weighted policy gradient; other rated answers (greedy,
# constrained, penalised) the advantage-weighted likelihood / unlikelihood; corrections SFT.
PATH_LOSSES: dict[str, Callable[[PathTokens, TenantConfig], torch.Tensor]] = {
    IMPORTANCE: lambda t, config: off_policy_loss(t.logp_N, t.behaviour_logp_N, t.advantages_N, config.is_cap),
    RATIO_FREE: lambda t, config: ratio_free_loss(t.logp_N, t.advantages_N),
    CORRECTION: lambda t, config: sft_loss(t.logp_N),
}


def path_loss(path: str, tokens: PathTokens, config: TenantConfig) -> torch.Tensor:
    return PATH_LOSSES[path](tokens, config)


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
        path_of = [paths[t][r] for r in rows_N.tolist()]
        importance_N = torch.tensor([p == IMPORTANCE for p in path_of], device=device)
        current_N = torch.tensor([d.current[r] for r in rows_N.tolist()], device=device) & importance_N
        results[t].gap.add(logp_N[current_N], behaviour_logp_N[current_N], rows_N[current_N])
        # Each path's loss is a mean over its tokens; their sum, weighted by token shares, is the mean over all.
        loss = logp_N.new_zeros(())
        for path in (IMPORTANCE, RATIO_FREE):
            mask = torch.tensor([p == path for p in path_of], device=device)
            if mask.any():
                tokens = PathTokens(logp_N[mask], behaviour_logp_N[mask], advantages_N[mask])
                loss = loss + path_loss(path, tokens, d.config) * (mask.sum() / mask.numel())
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
        return path_loss(CORRECTION, PathTokens(logp_N), corrected[t].config) * corrected[t].config.weights.correction

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
