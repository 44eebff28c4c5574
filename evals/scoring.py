"""Score one adapter version on a suite: greedy answers through the gateway, rewards averaged.

Eval requests use the gateway's admin chat endpoint (`/admin/customers/{c}/v1`, the openai SDK's
base URL): the named version is leased like any request, and the answers are not captured as the
customer's traffic, so evals never feed the trainer.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import openai
from pydantic import BaseModel

from clora.agents.arithmetic import generate_in
from clora.agents.catalog import make_env
from clora.agents.envs import Completion
from clora.agents.runner import run_arithmetic
from clora.evals.intervals import interval90
from clora.evals.suites import EvalSuite


class EvalScore(BaseModel):
    adapter: str  # version name, or the base model's served name
    suite: str  # fingerprint
    score: float  # mean reward, 0..1
    n: int
    low: float | None = None  # the score's 90% interval (None: scored before intervals were kept)
    high: float | None = None
    content: float | None = None  # share of answers that still answer the question (environments with a check)
    seconds: float
    at: float
    answers: list[str] = []  # the answers' texts (for reports and leakage checks)


def admin_chat_client(gateway_url: str, admin_key: str, customer: str, timeout_s: float = 600.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway_url}/admin/customers/{customer}/v1", api_key=admin_key,
                              timeout=timeout_s, max_retries=3)


# (model, messages, max_tokens) -> the model's greedy answer
Chat = Callable[[str, list[dict[str, Any]], int], Awaitable[Completion]]


def greedy_chat(client: openai.AsyncOpenAI) -> Chat:
    async def chat(model: str, messages: list[dict[str, Any]], max_tokens: int) -> Completion:
        response = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0.0)
        choice = response.choices[0]
        return Completion(choice.message.content or "", list(getattr(choice, "token_ids", None) or []),
                          choice.finish_reason)
    return chat


class SharedAnswers:
    """Greedy answers of a model that is the same for every customer (the base model), asked once:
    customers' suites draw the same questions, and an immutable model's greedy answer never changes
    (the demo scores five customers' base model on 64 shared questions: 64 requests, not 320)."""

    def __init__(self) -> None:
        self._answers: dict[str, asyncio.Future[Completion]] = {}
        self.asked = 0  # requests actually sent

    def chat(self, chat: Chat) -> Chat:
        async def shared(model: str, messages: list[dict[str, Any]], max_tokens: int) -> Completion:
            key = json.dumps([model, messages, max_tokens], sort_keys=True)
            if key not in self._answers:  # concurrent askers of one question wait for one request
                self.asked += 1
                self._answers[key] = asyncio.ensure_future(chat(model, messages, max_tokens))
            try:
                return await asyncio.shield(self._answers[key])
            except Exception:
                self._answers.pop(key, None)  # a failed request is asked again next time
                raise
        return shared


async def score(client: openai.AsyncOpenAI, suite: EvalSuite, model: str, chat: Chat | None = None) -> EvalScore:
    """Greedy answers of `model` to every prompt of the suite (concurrently: the engine batches them),
    asked through `chat` when given (shared answers), else the client."""
    started = time.perf_counter()
    chat = chat or greedy_chat(client)
    rng = random.Random(suite.seed)
    rewards: list[float]
    content: list[float] = []
    if suite.golden:
        texts = [c.text for c in await asyncio.gather(*[chat(model, case.messages, suite.max_tokens)
                                                       for case in suite.golden])]
        rewards = [float(t.strip() == case.expected.strip()) for t, case in zip(texts, suite.golden)]
    elif suite.environment.startswith("arithmetic:"):
        level = int(suite.environment.partition(":")[2] or 1)
        problems = [generate_in(rng, level, suite.split) for _ in range(suite.n)]
        episodes = await asyncio.gather(*[run_arithmetic(client, problem, model=model, max_tokens=suite.max_tokens)
                                          for problem in problems])
        rewards = [e.reward for e in episodes]
        texts = [f"{e.calculator_calls} -> {e.final_answer} ({e.stopped})" for e in episodes]
    else:
        env = make_env(suite.environment)
        prompts = env.prompts(rng, suite.n, suite.split)
        completions = await asyncio.gather(*[chat(model, p, suite.max_tokens) for p in prompts])
        rewards = [env.reward(p, c) for p, c in zip(prompts, completions)]
        texts = [c.text for c in completions]
        if hasattr(env, "content"):
            content = [env.content(p, c) for p, c in zip(prompts, completions)]
    low, high = interval90(rewards)
    return EvalScore(adapter=model, suite=suite.fingerprint(), score=sum(rewards) / len(rewards), n=len(rewards),
                     low=low, high=high, content=sum(content) / len(content) if content else None,
                     seconds=time.perf_counter() - started, at=time.time(), answers=texts)


def shown(score: EvalScore | None) -> str:
    """A score with its 90% interval, for tables."""
    if score is None:
        return "-"
    if score.low is None or score.high is None:
        return f"{score.score:.3f}"
    return f"{score.score:.3f} [{score.low:.2f}, {score.high:.2f}]"
