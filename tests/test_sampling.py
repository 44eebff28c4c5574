"""The trainer's sampler processing (trainer/sampling.py) against vLLM's own, and the sampling
parameters the gateway records for each answer."""

from __future__ import annotations

import math

import pytest
import torch

from clora.runtime.protocol import ChatRequest, sampler_of
from clora.trainer.sampling import Processing, kept, processed_logprobs
from clora.wire.interactions import Sampler


def test_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.8 >= 0.75), renormalised.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    processing = Processing(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.75]))
    logp = processed_logprobs(logits, torch.tensor([1]), processing)
    assert float(logp) == pytest.approx(math.log(0.3 / 0.8), abs=1e-6)
    assert float(processed_logprobs(logits, torch.tensor([2]), processing)) == float("-inf")
    # Temperature first: T = 0.5 squares the probabilities (then renormalised).
    tempered = Processing(torch.tensor([0.5]), torch.tensor([0]), torch.tensor([1.0]))
    squares = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert float(processed_logprobs(logits, torch.tensor([0]), tempered)) == pytest.approx(
        math.log(float(squares[0] / squares.sum())), abs=1e-6)


def test_top_k_keeps_ties_and_top_p_always_keeps_the_most_likely():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert kept(z, torch.tensor([1]), torch.tensor([1.0])).tolist() == [[False, True, True, False]]
    assert kept(z, torch.tensor([0]), torch.tensor([1e-9])).sum() == 1


@pytest.mark.integration  # starts a process (vLLM runs `file` on import)
def test_masks_match_vllms_sampler_on_random_logits():
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4096, generator=generator) * 3
    top_k = torch.tensor([0, 5, 50, 4096] * 16)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95] * 16)
    for k, p in ((top_k, top_p), (torch.zeros_like(top_k), top_p), (top_k, torch.ones_like(top_p))):
        theirs = apply_top_k_top_p_pytorch(logits.clone(), torch.where(k > 0, k, 4096),
                                           p, allow_cpu_sync=True)
        assert torch.equal(kept(logits, k, p), torch.isfinite(theirs))


def test_gradient_is_that_of_the_truncated_renormalised_distribution():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1), requires_grad=True)
    targets = torch.tensor([int(logits[i].argmax()) for i in range(3)])
    processing = Processing(torch.tensor([0.7, 1.0, 1.3]), torch.tensor([0, 10, 0]), torch.tensor([0.9, 1.0, 0.8]))
    processed_logprobs(logits, targets, processing).sum().backward()
    ours = logits.grad.clone()

    logits.grad = None
    keep = kept((logits / processing.temperature_N[:, None]).detach(), processing.top_k_N, processing.top_p_N)
    by_hand = torch.stack([
        torch.log_softmax(logits[i][keep[i]] / processing.temperature_N[i], dim=-1)[int(keep[i][:targets[i]].sum())]
        for i in range(3)])
    by_hand.sum().backward()
    assert torch.allclose(ours, logits.grad, atol=1e-6)
    assert bool((ours[~keep] == 0).all())  # dropped tokens get no gradient


def test_raw_rows_are_left_alone():
    logits = torch.randn(4, 30)
    targets = torch.tensor([1, 2, 3, 4])
    rows = torch.tensor([0, 0, 1, 1])
    assert Processing.of_rows([None, Sampler()], rows) is None
    processing = Processing.of_rows([None, Sampler(temperature=0.5)], rows)
    both = processed_logprobs(logits, targets, processing, with_raw=True)
    raw = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(both[0, :2], raw[:2]) and not torch.allclose(both[0, 2:], raw[2:])
    assert torch.allclose(both[1], raw)


@pytest.mark.parametrize(("extra", "reproducible"), [
    ({}, True),
    ({"temperature": 0.7, "top_p": 0.9, "top_k": 40}, True),
    ({"temperature": 0}, False),  # greedy
    ({"response_format": {"type": "json_object"}}, False),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, False),
    ({"presence_penalty": 0.5}, False),
    ({"logit_bias": {"42": 5}}, False),
    ({"min_p": 0.1}, False),
])
def test_the_gateway_records_what_vllm_samples_with(extra, reproducible):
    raw = {"model": "default", "messages": [{"role": "user", "content": "hi"}], **extra}
    sampler = sampler_of(ChatRequest.model_validate(raw), raw)
    assert sampler.reproducible() is reproducible
    assert sampler.temperature == extra.get("temperature", 1.0) and sampler.top_p == extra.get("top_p", 1.0)
    assert sampler.top_k == extra.get("top_k", 0)
