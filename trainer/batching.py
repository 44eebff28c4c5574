"""Forward passes that give per-token logprobs of completions, computing nothing twice.

- `sequence_logprobs`: plain rows (prompt + completion, right-padded); logits only at completion
  positions, in chunks.
- `shared_prefix_logprobs`: a GRPO group's K completions share one prompt: the prompt is run once,
  its key/value cache expanded to K rows, and gradients flow back through the one prompt pass;
  several groups (of several tenants) share one pass, packed by `pack_groups`. A row may start
  with context tokens that are conditioned on but not scored (a multi-turn episode's later turn:
  its earlier answer and the tool's result after the shared prompt), so every turn of a group's
  episodes shares the one prompt pass.
- `multi_tenant_backward`: rows of several tenants in one pass (one base matmul over all rows,
  each tenant's LoRA on its own rows); each tenant's loss reaches only its own weights. Rows are
  packed into passes of at most `max_tokens` tokens: on a CPU, passes past ~1k tokens run slower
  per token (cache misses), while a GPU wants every tenant in one pass.

Logits are the big tensor here (tokens x 49k vocabulary): `chunked_logprobs` computes them a chunk
at a time and recomputes them during backward instead of keeping them. Rows may carry the sampler
that produced them (`Sampler`): their logprobs are then of the processed distribution (sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clora.trainer.lora import LoRAWeights, MultiLoRALinear, Segment, bind
from clora.trainer.sampling import Processing, processed_logprobs
from clora.wire.interactions import Sampler

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


def shared_prefix_logprobs(model: nn.Module, layers: dict[str, MultiLoRALinear], groups: list[PrefixGroup],
                           with_raw: bool = False) -> Completions:
    """Every group's K completions over its prompt, groups of several tenants in one pass: each
    prompt runs once (left-padded to the longest, so every prompt ends at the same column), its
    key/value cache is expanded to its group's K rows, and all completions run in one forward over
    those caches; gradients reach each prompt's pass through its cache. Rows are numbered over
    all groups in order; logprobs under each group's sampler processing (and raw ones if `with_raw`)."""
    device = model.lm_head.weight.device
    width = max(len(g.prompt) for g in groups)
    prompt_ids = torch.tensor([[0] * (width - len(g.prompt)) + g.prompt for g in groups], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(g.prompt)) + [1] * len(g.prompt) for g in groups], device=device)
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    with bind(layers, segments_of([g.weights for g in groups])):
        prefix = model.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                             use_cache=True)
    group_of_row = torch.tensor([i for i, g in enumerate(groups) for _ in g.completions], device=device)
    cache = prefix.past_key_values  # in the autograd graph: gradients reach the prompt pass
    cache.batch_select_indices(group_of_row)
    row_tokens = [r for g in groups for r in g.rows()]
    comp = pad(row_tokens, device)
    lengths = torch.tensor([len(g.prompt) for g in groups], device=device)[group_of_row]
    positions = lengths[:, None] + torch.arange(comp.shape[1], device=device)
    mask = torch.cat([prompt_mask[group_of_row], torch.ones_like(comp)], dim=1)
    with bind(layers, segments_of([g.weights for g in groups for _ in g.completions])):
        hidden = model.model(input_ids=comp, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True).last_hidden_state
    rows, cols = [], []
    completions = [c for g in groups for c in g.completions]
    for i, (c, start) in enumerate(zip(completions, [s for g in groups for s in g.scored_from()])):
        rows += [i] * len(c)
        cols += range(start, start + len(c))
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    # Token j of a row is predicted by its hidden state j - 1, or for j = 0 by its prompt's last
    # hidden state (the last column for every prompt: left padding).
    last_prompt = prefix.last_hidden_state[:, -1][group_of_row[rows_t]]
    h = torch.where((cols_t == 0)[:, None], last_prompt, hidden[rows_t, (cols_t - 1).clamp(min=0)])
    processing = Processing.of_rows([g.sampler for g in groups for _ in g.completions], rows_t) \
        if any(g.sampler for g in groups) else None
    logprobs = chunked_logprobs(model.lm_head, h, comp[rows_t, cols_t], processing, with_raw=with_raw)
    if with_raw:
        return Completions(logprobs[0], rows_t, logprobs[1])
    return Completions(logprobs, rows_t)


def pack_groups(groups: list[PrefixGroup], max_tokens: int) -> list[list[int]]:
    """Group indices in order, cut into passes whose padded size (prompts plus completions) stays
    within max_tokens; a group larger than that gets a pass of its own."""
    passes: list[list[int]] = [[]]
    prompt_width = completion_width = 0
    for i, g in enumerate(groups):
        width = max(len(r) for r in g.rows())
        pw, cw = max(prompt_width, len(g.prompt)), max(completion_width, width)
        rows = sum(len(groups[j].completions) for j in passes[-1]) + len(g.completions)
        if passes[-1] and (len(passes[-1]) + 1) * pw + rows * cw > max_tokens:
            passes.append([])
            pw, cw = len(g.prompt), width
        passes[-1].append(i)
        prompt_width, completion_width = pw, cw
    return [p for p in passes if p]


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


def pack(batches: list[TenantBatch], max_tokens: int) -> list[list[tuple[int, int]]]:
    """(tenant, row) pairs in order, cut into passes whose padded size stays within max_tokens."""
    passes: list[list[tuple[int, int]]] = [[]]
    width = 0
    for t, batch in enumerate(batches):
        for r, (p, c) in enumerate(zip(batch.prompts, batch.completions)):
            new_width = max(width, len(p) + len(c))
            if passes[-1] and (len(passes[-1]) + 1) * new_width > max_tokens:
                passes.append([])
                new_width = len(p) + len(c)
            passes[-1].append((t, r))
            width = new_width
    return [p for p in passes if p]


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
