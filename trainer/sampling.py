"""The sampler's processing on the trainer's logits, so that its logprobs are of the distribution
vLLM sampled from (served with `logprobs_mode=processed_logprobs`).

vLLM (0.32, `v1/sample/`) divides the logits by the temperature, then masks top-k and top-p on the
sorted logits (ascending: top-k keeps every logit >= the k-th largest, ties included; top-p drops
the tokens whose cumulative probability from the bottom is <= 1 - p, always keeping the most
likely), and the logprobs are a log-softmax over what is left: the kept tokens renormalised.
`processed_logprobs` does the same to the trainer's own logits. The masks are taken from its own
logits (no gradient flows through which tokens are kept); the gradient of a kept token's logprob
is then that of the truncated, renormalised distribution, which is the policy that sampled.

Shapes as in `losses.py`: `N` tokens, `V` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clora.wire.interactions import Sampler


@dataclass(frozen=True)
class Processing:
    """Per-token sampling parameters of a pass (each token takes its row's)."""

    temperature_N: torch.Tensor  # float
    top_k_N: torch.Tensor  # long, 0: off
    top_p_N: torch.Tensor  # float, 1.0: off

    @classmethod
    def of_rows(cls, samplers: list[Sampler | None], rows_N: torch.Tensor) -> Processing | None:
        """Per-token parameters from per-row samplers (None: the raw distribution); None if every row is raw."""
        if all(s is None or is_raw(s) for s in samplers):
            return None
        raw = Sampler()
        rows = [s or raw for s in samplers]
        device = rows_N.device
        temperature = torch.tensor([s.temperature for s in rows], dtype=torch.float32, device=device)
        top_k = torch.tensor([s.top_k for s in rows], dtype=torch.long, device=device)
        top_p = torch.tensor([s.top_p for s in rows], dtype=torch.float32, device=device)
        return cls(temperature[rows_N], top_k[rows_N], top_p[rows_N])

    def slice(self, start: int, stop: int) -> Processing:
        return Processing(self.temperature_N[start:stop], self.top_k_N[start:stop], self.top_p_N[start:stop])


def is_raw(sampler: Sampler) -> bool:
    """Whether the processing leaves the distribution as it is."""
    return sampler.temperature == 1.0 and sampler.top_k == 0 and sampler.top_p >= 1.0


def processed_logprobs(logits_N_V: torch.Tensor, targets_N: torch.Tensor, processing: Processing | None,
                       with_raw: bool = False) -> torch.Tensor:
    """log p(target) under the sampler's distribution: temperature, then top-k and top-p, renormalised.
    Float32 whatever the model's dtype. A target outside the kept set gets -inf. With `with_raw`,
    [2, N]: these, then the unprocessed distribution's (for a KL between models, not samplers)."""
    raw_N_V = logits_N_V.float()
    z = raw_N_V
    if processing is not None:
        z = z / processing.temperature_N[:, None]
        if bool((processing.top_k_N > 0).any() or (processing.top_p_N < 1.0).any()):
            z = z.masked_fill(~kept(z.detach(), processing.top_k_N, processing.top_p_N), float("-inf"))
    processed_N = torch.log_softmax(z, dim=-1).gather(-1, targets_N[:, None]).squeeze(-1)
    if not with_raw:
        return processed_N
    raw_N = processed_N if processing is None else \
        torch.log_softmax(raw_N_V, dim=-1).gather(-1, targets_N[:, None]).squeeze(-1)
    return torch.stack([processed_N, raw_N])


def kept(z_N_V: torch.Tensor, top_k_N: torch.Tensor, top_p_N: torch.Tensor) -> torch.Tensor:
    """The tokens top-k and top-p keep, as vLLM computes them (on temperature-scaled logits)."""
    vocab = z_N_V.shape[-1]
    sorted_N_V, order_N_V = z_N_V.sort(dim=-1)  # ascending
    drop_N_V = torch.zeros_like(sorted_N_V, dtype=torch.bool)
    k_N = torch.where(top_k_N > 0, top_k_N.clamp(max=vocab), vocab)
    kth_N = sorted_N_V.gather(-1, (vocab - k_N)[:, None])
    drop_N_V |= sorted_N_V < kth_N
    probs_N_V = sorted_N_V.masked_fill(drop_N_V, float("-inf")).softmax(dim=-1)
    drop_N_V |= probs_N_V.cumsum(dim=-1) <= (1 - top_p_N)[:, None]
    drop_N_V[:, -1] = False  # the most likely token always stays
    return torch.zeros_like(drop_N_V).scatter(-1, order_N_V, ~drop_N_V)
