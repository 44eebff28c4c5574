"""Forward passes that give per-token logprobs of completions, computing nothing twice.

- `sequence_logprobs`: plain rows (prompt + completion, right-padded); logits only at completion
  positions, in chunks.
- `shared_prefix_logprobs`: a GRPO group's K completions share one prompt: the prompt is run once,
  its key/value cache expanded to K rows, and gradients flow back through the one prompt pass.
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


def shared_prefix_logprobs(model: nn.Module, prompt: list[int], completions: list[list[int]],
                           sampler: Sampler | None = None, with_raw: bool = False) -> Completions:
    """K completions of one prompt: the prompt's forward runs once and its cache serves all K
    (their logprobs under the sampler's processing when given, and the raw ones if `with_raw`)."""
    device = model.lm_head.weight.device
    k = len(completions)
    prefix = model.model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = prefix.past_key_values  # in the autograd graph: gradients reach the prompt pass
    cache.batch_repeat_interleave(k)
    comp = pad(completions, device)
    positions = torch.arange(len(prompt), len(prompt) + comp.shape[1], device=device).expand(k, -1)
    hidden = model.model(input_ids=comp, position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
    last_prompt = prefix.last_hidden_state[0, -1]
    rows, cols = [], []
    for i, c in enumerate(completions):
        rows += [i] * len(c)
        cols += range(len(c))
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    # Token j of completion i is predicted by the completion's hidden state j - 1, or for j = 0 by
    # the prompt's last hidden state (shared by all K).
    h = torch.where((cols_t == 0)[:, None], last_prompt.expand(len(rows), -1), hidden[rows_t, (cols_t - 1).clamp(min=0)])
    processing = Processing.of_rows([sampler] * k, rows_t) if sampler else None
    logprobs = chunked_logprobs(model.lm_head, h, comp[rows_t, cols_t], processing, with_raw=with_raw)
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
        segments: list[Segment] = []
        for i, (t, _) in enumerate(rows):
            if segments and segments[-1].weights is batches[t].weights:
                segments[-1].stop = i + 1
            else:
                segments.append(Segment(i, i + 1, batches[t].weights))
        with bind(layers, segments):
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
