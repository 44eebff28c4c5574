"""Forward passes that give per-token logprobs of completions, computing nothing twice.

- `sequence_logprobs`: plain rows (prompt + completion, right-padded); logits only at completion
  positions, in chunks.
- `shared_prefix_logprobs`: a GRPO group's K completions share one prompt: the prompt is run once,
  its key/value cache expanded to K rows, and gradients flow back through the one prompt pass;
  several groups (of several tenants) share one pass, packed by `pack_groups`. A row may start
  with context tokens that are conditioned on but not scored (a multi-turn episode's later turn:
  its earlier answer and the tool's result after the shared prompt), so every turn of a group's
  episodes shares the one prompt pass. Rows continue from the prompt in forwards of rows of
  similar length (`length_buckets`), so short first answers are not padded to long later turns.
- `multi_tenant_backward`: rows of several tenants in one pass (one base matmul over all rows,
  each tenant's LoRA on its own rows); each tenant's loss reaches only its own weights. Rows are
  packed into passes of at most `max_tokens` tokens: on a CPU, passes past ~1k tokens run slower
  per token (cache misses), while a GPU wants every tenant in one pass.

Logits are the big tensor here (tokens x 49k vocabulary): `chunked_logprobs` computes them a chunk
at a time and recomputes them during backward instead of keeping them. Rows may carry the sampler
that produced them (`Sampler`): their logprobs are then of the processed distribution (sampling.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clora.trainer.lora import LoRAWeights, MultiLoRALinear, Segment, bind
from clora.trainer.packing import length_buckets, pack
from clora.trainer.sampling import Processing, processed_logprobs
from clora.wire.interactions import Sampler

if TYPE_CHECKING:  # types only
    from transformers.cache_utils import Cache

CHUNK_TOKENS = 512


@dataclass
class Completions:
    """Flat per-token results of a pass: logprob of each completion token and which row it is in."""

    logprobs: torch.Tensor  # [N], under each row's sampler processing
    rows: torch.Tensor  # [N] row index of each token
    raw_logprobs: torch.Tensor | None = None  # [N], of the unprocessed distribution (when asked for)


def _chunk_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    processing: Processing | None, with_raw: bool) -> torch.Tensor:
    return processed_logprobs(lm_head(hidden), targets, processing, with_raw)


def chunked_logprobs(lm_head: nn.Module, hidden_N_H: torch.Tensor, targets_N: torch.Tensor,
                     processing: Processing | None = None, chunk: int = CHUNK_TOKENS,
                     with_raw: bool = False) -> torch.Tensor:
    """log p(target | hidden) without ever holding [N, vocab] logits (recomputed in backward),
    under the sampler's processing when given; [2, N] with the unprocessed ones too if `with_raw`."""
    out = []
    for start in range(0, hidden_N_H.shape[0], chunk):
        h, t = hidden_N_H[start:start + chunk], targets_N[start:start + chunk]
        p = processing.slice(start, start + chunk) if processing is not None else None
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_chunk_logprobs, lm_head, h, t, p, with_raw, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(lm_head, h, t, p, with_raw))
    if not out:
        return hidden_N_H.new_zeros((2, 0) if with_raw else (0,))
    return torch.cat(out, dim=-1)


def pad(rows: list[list[int]], device: torch.device, value: int = 0) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def sequence_logprobs(model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                      samplers: list[Sampler | None] | None = None) -> Completions:
    """Each row is prompt + completion, right-padded (causal attention: padding only follows);
    a row's logprobs under its sampler's processing when `samplers` gives one."""
    device = model.lm_head.weight.device
    input_ids = pad([p + c for p, c in zip(prompts, completions)], device)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    rows, positions = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        rows += [i] * len(c)
        positions += range(len(p), len(p) + len(c))
    rows_t = torch.tensor(rows, device=device)
    positions_t = torch.tensor(positions, device=device)
    processing = Processing.of_rows(samplers, rows_t) if samplers else None
    # The token at position t is predicted by the hidden state at t - 1.
    logprobs = chunked_logprobs(model.lm_head, hidden[rows_t, positions_t - 1], input_ids[rows_t, positions_t],
                                processing)
    return Completions(logprobs, rows_t)


@dataclass
class PrefixGroup:
    """K completions of one prompt (a GRPO group), for one tenant's weights (None: the base model).
    A completion may follow context tokens of its own (`contexts`, same order; not scored)."""

    prompt: list[int]
    completions: list[list[int]]
    weights: LoRAWeights | None = None
    sampler: Sampler | None = None  # the group's logprobs under that processing
    contexts: list[list[int]] | None = None  # per completion: tokens between the prompt and it

    def tokens(self) -> int:
        """Scored tokens."""
        return sum(len(c) for c in self.completions)

    def rows(self) -> list[list[int]]:
        """Each row's tokens after the prompt: its context, then its completion."""
        if self.contexts is None:
            return self.completions
        return [x + c for x, c in zip(self.contexts, self.completions)]

    def scored_from(self) -> list[int]:
        """Per row, the column of its first scored token."""
        return [len(x) for x in self.contexts] if self.contexts is not None else [0] * len(self.completions)


def segments_of(weights: list[LoRAWeights | None]) -> list[Segment]:
    """Rows -> tenants: one segment per run of rows with the same weights (none if no row has any)."""
    if all(w is None for w in weights):
        return []
    segments: list[Segment] = []
    for i, w in enumerate(weights):
        if segments and segments[-1].weights is w:
            segments[-1].stop = i + 1
        else:
            segments.append(Segment(i, i + 1, w))
    return segments


def _rows_of_cache(cache: Cache, indices: torch.Tensor) -> Cache:
    """A view of the prompt cache expanded to `indices` (its rows' groups), the original untouched:
    each length bucket continues from its own copy, all of them in the autograd graph."""
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(indices)
    return rows


def shared_prefix_logprobs(model: nn.Module, layers: dict[str, MultiLoRALinear], groups: list[PrefixGroup],
                           with_raw: bool = False) -> Completions:
    """Every group's K completions over its prompt, groups of several tenants in one pass: each
    prompt runs once (left-padded to the longest, so every prompt ends at the same column), its
    key/value cache is expanded to its group's K rows, and the rows continue over those caches in
    forwards of rows of similar length (`length_buckets`: an episode's first answers are short,
    its later turns long, and padding them all to the longest would waste about a third of the
    pass); gradients reach each prompt's pass through its cache. Rows are numbered over all
    groups in order; logprobs under each group's sampler processing (and raw ones if `with_raw`)."""
    device = model.lm_head.weight.device
    width = max(len(g.prompt) for g in groups)
    prompt_ids = torch.tensor([[0] * (width - len(g.prompt)) + g.prompt for g in groups], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(g.prompt)) + [1] * len(g.prompt) for g in groups], device=device)
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    with bind(layers, segments_of([g.weights for g in groups])):
        prefix = model.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                             use_cache=True)
    group_of_row = [i for i, g in enumerate(groups) for _ in g.completions]
    row_weights = [g.weights for g in groups for _ in g.completions]
    row_tokens = [r for g in groups for r in g.rows()]
    completions = [c for g in groups for c in g.completions]
    scored_from = [s for g in groups for s in g.scored_from()]
    first_token = [0]  # each row's first scored token in the flat [N] order
    for c in completions:
        first_token.append(first_token[-1] + len(c))
    # Token j of a row is predicted by its hidden state j - 1, or for j = 0 by its prompt's last
    # hidden state (the last column for every prompt: left padding).
    last_prompt = prefix.last_hidden_state[:, -1]
    parts, order = [], []
    for bucket in length_buckets([len(r) for r in row_tokens]):
        groups_b = torch.tensor([group_of_row[i] for i in bucket], device=device)
        comp = pad([row_tokens[i] for i in bucket], device)
        lengths = torch.tensor([len(groups[group_of_row[i]].prompt) for i in bucket], device=device)
        positions = lengths[:, None] + torch.arange(comp.shape[1], device=device)
        mask = torch.cat([prompt_mask[groups_b], torch.ones_like(comp)], dim=1)
        with bind(layers, segments_of([row_weights[i] for i in bucket])):
            hidden = model.model(input_ids=comp, attention_mask=mask, position_ids=positions,
                                 past_key_values=_rows_of_cache(prefix.past_key_values, groups_b),
                                 use_cache=True).last_hidden_state
        rows, cols = [], []
        for j, i in enumerate(bucket):
            rows += [j] * len(completions[i])
            cols += range(scored_from[i], scored_from[i] + len(completions[i]))
            order += range(first_token[i], first_token[i + 1])
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        parts.append(torch.where((cols_t == 0)[:, None], last_prompt[groups_b[rows_t]],
                                 hidden[rows_t, (cols_t - 1).clamp(min=0)]))
    # Back to row order: token k of the flat order is at position inverse[k] of the buckets' order.
    inverse = torch.empty(len(order), dtype=torch.long, device=device)
    inverse[torch.tensor(order, dtype=torch.long, device=device)] = torch.arange(len(order), device=device)
    h = torch.cat(parts)[inverse]
    rows_t = torch.tensor([i for i, c in enumerate(completions) for _ in c], device=device)
    targets = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=device)
    processing = Processing.of_rows([g.sampler for g in groups for _ in g.completions], rows_t) \
        if any(g.sampler for g in groups) else None
    logprobs = chunked_logprobs(model.lm_head, h, targets, processing, with_raw=with_raw)
    if with_raw:
        return Completions(logprobs[0], rows_t, logprobs[1])
    return Completions(logprobs, rows_t)


@dataclass
class TenantBatch:
    """One tenant's rows for a step."""

    weights: LoRAWeights
    prompts: list[list[int]]
    completions: list[list[int]]
    samplers: list[Sampler | None] | None = None  # per row: its logprobs under that processing

    def tokens(self) -> int:
        return sum(len(c) for c in self.completions)


# loss_fn(tenant index, logprobs of some of its completion tokens, their row indices within the
# tenant's batch) -> mean loss over those tokens.
LossFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def multi_tenant_backward(model: nn.Module, layers: dict[str, MultiLoRALinear], batches: list[TenantBatch],
                          loss_fn: LossFn, max_tokens: int) -> list[float]:
    """Backward of every tenant's loss, tenants' rows sharing passes. A tenant's token-mean loss is
    split over the passes its rows fall in, weighted by token share, so its gradients are those of
    one pass over its rows alone. Returns each tenant's loss."""
    totals = [batch.tokens() for batch in batches]
    losses = [0.0] * len(batches)
    for rows in pack(batches, max_tokens):
        with bind(layers, segments_of([batches[t].weights for t, _ in rows])):
            samplers = [batches[t].samplers[r] if batches[t].samplers else None for t, r in rows]
            result = sequence_logprobs(model, [batches[t].prompts[r] for t, r in rows],
                                       [batches[t].completions[r] for t, r in rows], samplers)
            local_rows = torch.tensor([r for _, r in rows], device=result.rows.device)
            tenant_of = torch.tensor([t for t, _ in rows], device=result.rows.device)
            total = result.logprobs.new_zeros(())
            for t in sorted({t for t, _ in rows}):
                mine = tenant_of[result.rows] == t
                share = mine.sum() / totals[t]
                loss = loss_fn(t, result.logprobs[mine], local_rows[result.rows[mine]]) * share
                losses[t] += float(loss.detach())
                total = total + loss
            total.backward()
    return losses
