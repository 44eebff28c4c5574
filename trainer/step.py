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

from typing import TYPE_CHECKING

import torch
from torch import nn

from clora.trainer.adapter_store import TenantState
from clora.trainer.lora import Layers, LoRAWeights, Segment, bind
from clora.trainer.onpolicy import onpolicy_backward
from clora.trainer.records import CORRECTION, correction_backward, offpolicy_backward, preference_backward
from clora.trainer.results import TenantResult

if TYPE_CHECKING:  # types only: this module loads with torch alone
    from clora.trainer.data import TenantData


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
