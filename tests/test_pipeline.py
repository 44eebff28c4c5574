"""Rollouts overlapping training (tiny random model, no server): a step's shares of engine and
trainer time, and groups sampled by the previous version (pipelined) trained as off-policy, their
logprob gap measured against the weights that sampled them."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import PrefixGroup, shared_prefix_logprobs
from clora.trainer.data import TenantData
from clora.trainer.lora import LoRASpec, inject, new_weights
from clora.trainer.rollouts import Group
from clora.trainer.step import backward
from clora.trainer.timeline import Timeline
from clora.wire.interactions import Sampler
from clora.wire.trainer_config import TenantConfig

SAMPLER = Sampler(temperature=0.8)  # random tokens: no top-p/top-k mask that would exclude them


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timeline_counts_overlapping_spans_once_and_splits_open_ones_across_steps():
    clock = Clock()
    timeline = Timeline(clock)
    with timeline.busy("engine"):  # 0-4: two rollouts in flight at once, 1-3 and 0-4
        clock.now = 1.0
        with timeline.busy("engine"):
            clock.now = 3.0
        clock.now = 4.0
    with timeline.busy("trainer"):  # 4-8
        clock.now = 8.0
    ahead = timeline.busy("engine")
    ahead.__enter__()  # sampling ahead from 8 on: still running when the step ends at 10
    clock.now = 10.0
    cycle, shares = timeline.cut()
    assert cycle == 10.0 and shares == {"engine": pytest.approx(0.6), "trainer": pytest.approx(0.4)}
    clock.now = 12.0  # the next step: the rest of that rollout (10-12), then the trainer (12-15)
    ahead.__exit__(None, None, None)
    with timeline.busy("trainer"):
        clock.now = 15.0
    cycle, shares = timeline.cut()
    assert cycle == 5.0 and shares == {"engine": pytest.approx(2 / 5), "trainer": pytest.approx(3 / 5)}


@pytest.fixture(scope="module")
def base(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, inject(model)


def sampled_group(model, layers, weights, rng: random.Random) -> Group:
    """Four completions of one prompt with the logprobs `weights` give them (as vLLM would report
    for the version holding them), rewards that differ."""
    prompt = [rng.randrange(1, 500) for _ in range(9)]
    completions = [[rng.randrange(1, 500) for _ in range(n)] for n in (3, 5, 4, 6)]
    with torch.no_grad():
        result = shared_prefix_logprobs(model, layers, [PrefixGroup(prompt, completions, weights, SAMPLER)])
    flat = result.logprobs.tolist()
    logprobs, at = [], 0
    for c in completions:
        logprobs.append(flat[at:at + len(c)])
        at += len(c)
    return Group(prompt, completions, logprobs, [1.0, 0.0, 0.5, 0.0], SAMPLER)


def test_lagged_groups_are_trained_off_policy_with_their_gap_against_the_sampling_weights(base):
    model, layers = base
    spec = LoRASpec(rank=8, alpha=16)
    sampling = new_weights(layers, spec, torch.Generator().manual_seed(1), init_b_zero=False)
    current = sampling.copy()  # one optimizer step later
    with torch.no_grad():
        for t in current.tensors():
            t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    rng = random.Random(0)
    groups = [sampled_group(model, layers, sampling, rng) for _ in range(2)]
    config = TenantConfig(clip=0.2)

    def run(behaviour):
        weights = current.copy()
        for t in weights.tensors():
            t.requires_grad_(True)
        data = TenantData("c", config, groups=groups, behaviour=behaviour)
        result = backward(model, layers, [data], {"c": TenantState("c", weights, [], [])}, pass_tokens=4096)["c"]
        return result, [t.grad for t in weights.tensors()]

    lagged, lagged_grads = run(sampling)
    as_current, current_grads = run(None)
    # Against the weights that sampled them the trainer reproduces vLLM's logprobs; against the
    # newer weights it does not (the gap the loop would wrongly skip the step for).
    assert lagged.lagged_groups == 2 and as_current.lagged_groups == 0
    assert lagged.gap.tokens == sum(len(c) for c in groups[0].completions)  # the first group, a sample
    assert lagged.gap.mean < 1e-5
    assert as_current.gap.mean > 1e-2
    # The loss is the same PPO against the logprobs they were sampled with: the importance
    # correction of one step's lag.
    assert lagged.losses["onpolicy"] == pytest.approx(as_current.losses["onpolicy"])
    for got, want in zip(lagged_grads, current_grads):
        torch.testing.assert_close(got, want)


def test_lagged_constrained_turns_take_their_ratio_from_the_weights_that_sampled_them(base):
    """Grammar-constrained turns (a forced tool call) have no vLLM logprobs to take a ratio
    against. Sampled a version behind, they must still be corrected for it: PPO against the
    trainer's logprobs under the sampling weights, the gradients of the same groups unconstrained
    with vLLM's logprobs (here exactly those weights' logprobs). Plain REINFORCE, right for a
    current version's samples, would treat the previous version's as the current one's."""
    model, layers = base
    spec = LoRASpec(rank=8, alpha=16)
    sampling = new_weights(layers, spec, torch.Generator().manual_seed(3), init_b_zero=False)
    current = sampling.copy()
    with torch.no_grad():
        for t in current.tensors():
            t.add_(0.2 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    rng = random.Random(1)
    groups = [sampled_group(model, layers, sampling, rng) for _ in range(2)]
    constrained = Sampler(temperature=SAMPLER.temperature, constrained=True)
    config = TenantConfig(clip=0.2)

    def grads(sampler, behaviour):
        weights = current.copy()
        for t in weights.tensors():
            t.requires_grad_(True)
        data = TenantData("c", config, groups=[replace(g, sampler=sampler) for g in groups], behaviour=behaviour)
        result = backward(model, layers, [data], {"c": TenantState("c", weights, [], [])}, pass_tokens=4096)["c"]
        return result, [t.grad for t in weights.tensors()]

    lagged, got = grads(constrained, sampling)
    _, want = grads(SAMPLER, sampling)
    _, reinforce = grads(constrained, None)
    assert lagged.lagged_groups == 2 and lagged.gap.tokens == 0  # no vLLM logprobs to compare
    for g, w in zip(got, want):  # float noise only: the two logprobs come from passes packed differently
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # The correction matters at this lag: REINFORCE's gradient is another one.
    assert sum(float((g - r).norm()) for g, r in zip(got, reinforce)) > 0.05 * sum(float(r.norm()) for r in reinforce)
