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
