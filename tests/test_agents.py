"""Arithmetic episodes against the real server (tiny random model) through the gateway with the
openai SDK: two-turn tool calling completes, the calculator's result goes back to the model, rewards
are computed, and every turn is a captured, trace-identified request."""

from __future__ import annotations

import random

import openai
from transformers import AutoTokenizer

from clora.agents.arithmetic import calculator_result, generate
from clora.agents.runner import run_arithmetic


async def test_arithmetic_episodes_complete_through_the_gateway(gateway, make_customer, tokenizer_dir):
    _, key = make_customer("agent")
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The random model would fill the JSON grammar's optional whitespace forever: bias it away.
    no_space = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    rng = random.Random(5)
    try:
        episodes = [await run_arithmetic(client, generate(rng, 1), max_tokens=64, logit_bias=no_space)
                    for _ in range(3)]
    finally:
        await client.close()
    for episode in episodes:
        assert episode.turns >= 1 and all(t.startswith("chatcmpl-") for t in episode.trace_ids)
        assert episode.reward in (0.0, 1.0)
        if episode.stopped == "completed":
            assert episode.turns == 2 and len(episode.calculator_calls) == 1
            expression, result = episode.calculator_calls[0]
            assert result == calculator_result(expression)  # what the model was told
            assert episode.reward == (1.0 if episode.final_answer == episode.problem.answer else 0.0)
    assert any(e.stopped == "completed" for e in episodes), [e.stopped for e in episodes]


async def test_the_trainer_samples_arithmetic_episodes_through_the_admin_api(gateway, make_customer, redis_url,
                                                                           tiny_model, tmp_path):
    """The trainer's side: K episodes per problem, their first turn one request with the agent's tools
    and a named tool (n=K), marked as sampled under a grammar; each turn's tokens and logprobs align;
    an episode goes on only after a valid calculator call, over a prompt that carries its result."""
    import redis.asyncio as aioredis

    from clora.wire.trainer_config import TenantConfig
    from tests.test_trainer_loop import make_trainer

    customer, _ = make_customer("episodes")
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path / "trainer")
    config = TenantConfig(environment="arithmetic:1", group_size=4, prompts_per_step=2, max_new_tokens=24,
                          temperature=1.0)
    try:
        groups = await trainer.io.sampler.groups(customer, config, random.Random(3), "base")
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()
    assert len(groups) == 2
    tokenizer = trainer.io.tokenizer
    for group in groups:
        assert 1 <= len(group.completions) <= 4 and len(group.later) == len(group.completions)
        assert group.sampler.constrained and group.sampler.temperature == 1.0
        assert "calculator" in tokenizer.decode(group.prompt_token_ids)  # the tools are in the prompt
        assert all(len(c) == len(lp) for c, lp in zip(group.completions, group.logprobs))
        assert all(r in (0.0, 1.0) for r in group.rewards)
        for turns in group.later:
            for turn in turns:
                assert len(turn.token_ids) == len(turn.logprobs) > 0
                assert len(turn.prompt_token_ids) > len(group.prompt_token_ids)  # the conversation so far
