"""Multi-turn episodes in the trainer (tiny random model, no server): an episode's later turns are
trained over the prompts the server saw (the conversation so far, tool results included), the loss
covers exactly the tokens the model sampled, every turn carries its episode's advantage, and turns
sampled under a grammar (a forced tool call) take the ratio-free loss and stay out of the logprob gap."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clora.agents.arithmetic import TOOLS, ArithmeticEpisode, Problem
from clora.agents.envs import Completion
from clora.trainer.adapter_store import TenantState
from clora.trainer.batching import sequence_logprobs, shared_prefix_logprobs
from clora.trainer.data import TenantData
from clora.trainer.lora import LoRASpec, Segment, bind, inject, new_weights
from clora.trainer.losses import group_advantages, policy_gradient_loss, ppo_clip_loss
from clora.trainer.onpolicy import GROUP_PASS_FACTOR, onpolicy_rows
from clora.trainer.rollouts import Group, Turn
from clora.trainer.step import backward
from clora.wire.interactions import Sampler
from clora.wire.trainer_config import TenantConfig

SAMPLED = Sampler(temperature=0.8)
FORCED = Sampler(temperature=0.8, constrained=True)  # tool_choice named: a grammar masked the vocabulary


@pytest.fixture(scope="module")
def base(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, inject(model), AutoTokenizer.from_pretrained(tiny_model)


def weights_of(layers, seed: int):
    weights = new_weights(layers, LoRASpec(rank=8, alpha=16), torch.Generator().manual_seed(seed), init_b_zero=False)
    for t in weights.tensors():
        t.requires_grad_(True)
    return weights


def grads(weights) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in weights.tensors()]
    for t in weights.tensors():
        t.grad = None
    return out


def call(name: str, arguments: str) -> list[dict]:
    return [{"id": "call-1", "type": "function", "function": {"name": name, "arguments": arguments}}]


def arithmetic_group(tokenizer, rng: random.Random, k: int, sampler: Sampler) -> Group:
    """K arithmetic episodes of one problem, rendered with the model's chat template as the server
    renders them: turn 1 (the calculator call) over the problem, turn 2 (final answer) over the
    conversation with the calculator's result in it. Some episodes end after turn 1."""
    problem = Problem("Ana has 3 apples. Ana gets 4 more. How many apples does Ana have now?", "3 + 4", 7, 1)

    def render(messages) -> list[int]:
        return tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)

    episodes = [ArithmeticEpisode(problem) for _ in range(k)]
    prompt = render(episodes[0].next_request()["messages"])
    completions, logprobs, later = [], [], []
    for i, episode in enumerate(episodes):
        expression = "3 + 4" if i % 2 == 0 else "3 * 4"
        first = tokenizer(f'{{"expression": "{expression}"}}', add_special_tokens=False).input_ids
        completions.append(first)
        logprobs.append([-rng.uniform(0.2, 2.0) for _ in first])
        episode.observe(Completion("", first, "tool_calls", call("calculator", f'{{"expression": "{expression}"}}')
                                   if i != k - 1 else None))
        turns = []
        if (request := episode.next_request()) is not None:
            said = request["messages"][-1]["content"]  # the calculator's result, taken as the answer
            answer = tokenizer(f'{{"answer": {said}}}', add_special_tokens=False).input_ids
            turns.append(Turn(render(request["messages"]), answer, [-rng.uniform(0.2, 2.0) for _ in answer]))
            episode.observe(Completion("", answer, "tool_calls", call("final_answer", f'{{"answer": {said}}}')))
        later.append(turns)
    return Group(prompt, completions, logprobs, [e.reward for e in episodes], sampler, later)


def test_the_loss_covers_exactly_the_tokens_the_model_sampled(base):
    model, layers, tokenizer = base
    group = arithmetic_group(tokenizer, random.Random(0), 4, FORCED)
    assert group.rewards == [1.0, 0.0, 1.0, 0.0]  # right, wrong expression (answers 12), right, no calculator call
    assert [len(t) for t in group.later] == [1, 1, 1, 0]
    second_prompt = tokenizer.decode(group.later[1][0].prompt_token_ids)
    assert '"3 * 4"' in second_prompt and "12" in second_prompt  # the conversation, with the tool's output

    weights = weights_of(layers, 1)
    rows = onpolicy_rows(0, group, weights)
    scored = [c for row in rows for c in row.group.completions]
    model_tokens = group.completions + [turn.token_ids for turns in group.later for turn in turns]
    assert scored == model_tokens  # every model token once; no prompt or tool-output token
    # Every later turn extends the first prompt: one item, the prompt run once for all turns, each
    # later turn's context (its earlier answer, the tool's output) conditioned on, not scored.
    assert len(rows) == 1 and rows[0].group.prompt == group.prompt_token_ids
    for turn, context, completion in zip([t for turns in group.later for t in turns], rows[0].group.contexts[4:],
                                         rows[0].group.completions[4:]):
        assert group.prompt_token_ids + context + completion == turn.prompt_token_ids + turn.token_ids
    assert rows[0].group.contexts[:4] == [[]] * 4
    advantages = group_advantages(torch.tensor([group.rewards]))[0]
    assert torch.equal(rows[0].advantages_R, advantages[[0, 1, 2, 3, 0, 1, 2]])
    result = shared_prefix_logprobs(model, layers, [r.group for r in rows])
    assert result.logprobs.numel() == sum(len(c) for c in model_tokens)
    # ... and each turn's logprobs are those of a plain pass over its own prompt.
    prompts = [group.prompt_token_ids] * 4 + [t.prompt_token_ids for ts in group.later for t in ts]
    with bind(layers, [Segment(0, len(prompts), weights)]):
        plain = sequence_logprobs(model, prompts, model_tokens, [FORCED] * len(prompts)).logprobs
    torch.testing.assert_close(result.logprobs, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler,pass_tokens", [(SAMPLED, 4096), (FORCED, 4096), (SAMPLED, None)],
                         ids=["sampled", "forced-tool", "groups-split-across-passes"])
def test_episode_gradients_are_each_turns_loss_with_its_episodes_advantage(base, sampler, pass_tokens):
    """The packed multi-turn step equals a hand-written one: every turn a plain row (its prompt,
    its tokens), the episode's advantage, PPO-clip against the server's logprobs for sampled turns,
    the ratio-free loss for grammar-forced ones; a token mean over the tenant's model tokens."""
    model, layers, tokenizer = base
    rng = random.Random(1)
    weights = weights_of(layers, 2)
    groups = [arithmetic_group(tokenizer, rng, 4, sampler), arithmetic_group(tokenizer, rng, 3, sampler)]
    # A turn rendered differently from its first prompt (a template that rewrites history) is
    # trained over its own whole prompt, apart from the group's shared pass.
    turn = groups[1].later[0][0]
    turn.prompt_token_ids = turn.prompt_token_ids[:1] + [turn.prompt_token_ids[2]] + turn.prompt_token_ids[2:]
    assert len(onpolicy_rows(0, groups[1], weights)) == 2
    config = TenantConfig(clip=0.2)

    rows = [(g.prompt_token_ids, c, lp, adv) for g in groups
            for c, lp, adv in zip(g.completions, g.logprobs, group_advantages(torch.tensor([g.rewards]))[0])]
    rows += [(turn.prompt_token_ids, turn.token_ids, turn.logprobs, adv) for g in groups
             for turns, adv in zip(g.later, group_advantages(torch.tensor([g.rewards]))[0]) for turn in turns]
    total = sum(len(c) for _, c, _, _ in rows)
    for prompt, completion, old, advantage in rows:
        with bind(layers, [Segment(0, 1, weights)]):
            logp = sequence_logprobs(model, [prompt], [completion], [sampler]).logprobs
        adv = advantage.expand(len(completion))
        loss = policy_gradient_loss(logp, adv) if sampler.constrained else ppo_clip_loss(logp, torch.tensor(old), adv, 0.2)
        (loss * len(completion) / total).backward()
    expected = grads(weights)

    if pass_tokens is None:  # a group's rows no longer fit one pass with its prompt: split, the prompt run again
        first = onpolicy_rows(0, groups[0], weights)[0]
        pass_tokens = (len(first.group.prompt) + 3 * max(len(r) for r in first.group.rows())) // GROUP_PASS_FACTOR
        parts = first.split(GROUP_PASS_FACTOR * pass_tokens)
        assert len(parts) > 2 and max(len(p.group.completions) for p in parts) > 1
    data = TenantData("c", config, groups=groups)
    result = backward(model, layers, [data], {"c": TenantState("c", weights, [], [])}, pass_tokens=pass_tokens)["c"]
    assert max(g.abs().max() for g in expected) > 0
    for got, want in zip(grads(weights), expected):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)
    # The logprob gap compares the server's logprobs only where they are comparable.
    assert result.gap.tokens == (0 if sampler.constrained else total)



@pytest.mark.parametrize("kl_coef", [0.0, 0.1], ids=["no-kl", "kl"])
def test_groups_whose_episodes_all_scored_the_same_take_no_pass(base, monkeypatch, kl_coef):
    """A group whose episodes all scored the same has advantage 0: PPO gives it no gradient, so it
    takes no pass (a low-reward task's step is mostly such groups), yet its tokens stay in the
    token mean; with a KL term it still pulls towards the base model, so it is passed."""
    from clora.trainer import onpolicy as step_module
    model, layers, tokenizer = base
    rng = random.Random(3)
    varied = arithmetic_group(tokenizer, rng, 4, SAMPLED)
    flat = arithmetic_group(tokenizer, rng, 4, SAMPLED)
    flat.rewards = [0.0] * 4
    passed_rows = []
    real_pass = step_module.shared_prefix_logprobs

    def counting_pass(model, layers, groups, **kwargs):
        if torch.is_grad_enabled():  # a training pass (a lone no-grad one measures the logprob gap)
            passed_rows.append(sum(len(g.completions) for g in groups if g.weights is not None))
        return real_pass(model, layers, groups, **kwargs)

    monkeypatch.setattr(step_module, "shared_prefix_logprobs", counting_pass)
    config = TenantConfig(clip=0.2, kl_coef=kl_coef)
    weights = weights_of(layers, 4)
    state = {"c": TenantState("c", weights, [], [])}
    backward(model, layers, [TenantData("c", config, groups=[varied, flat])], state, pass_tokens=4096)
    both = grads(weights)
    rows = [len(onpolicy_rows(0, g, weights)[0].group.completions) for g in (varied, flat)]
    assert sum(passed_rows) == (rows[0] + rows[1] if kl_coef else rows[0])

    passed_rows.clear()
    flat_gap = backward(model, layers, [TenantData("c", config, groups=[flat])], state, pass_tokens=4096)["c"].gap
    assert sum(passed_rows) == (rows[1] if kl_coef else 0)
    if not kl_coef:
        assert all(t.grad is None for t in weights.tensors())
        assert flat_gap.tokens == sum(len(c) for c in onpolicy_rows(0, flat, weights)[0].group.completions)
        # The flat group's tokens still count in the token mean: the gradients are the varied
        # group's alone, scaled by its share of the tokens.
        backward(model, layers, [TenantData("c", config, groups=[varied])], state, pass_tokens=4096)
        share = onpolicy_rows(0, varied, weights)[0].group.tokens() / sum(
            onpolicy_rows(0, g, weights)[0].group.tokens() for g in (varied, flat))
        for got, alone in zip(both, grads(weights)):
            torch.testing.assert_close(got, alone * share, rtol=2e-4, atol=1e-7)
    else:
        grads(weights)
