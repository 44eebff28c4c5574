"""Simulated production: customers' agents asking questions, and an operator reviewing answers.

A simulated customer is an agent in production: it asks questions from the training pool through
the OpenAI-compatible endpoint with its own API key (so every answer is captured for learning).
The simulated operator reviews answers like a support lead who knows each customer's house rule,
with the eval's own criterion (the rule followed *and* the question answered: a list of "- -"
is not a good answer, whatever its form): thumbs up when the answer is good; otherwise thumbs down
and the corrected answer, sent through the feedback webhook with the answer's trace id, as a real
operator's tool would. Some customers' operators never correct (`corrects=False`): they score each
answer on a rubric (`PreferenceEnv.rubric`: 1.0 when good, partial credit when close) and send the
score as the feedback's `reward`, on its -1..1 scale (2 x score - 1: a rating is +1 or -1, and 0 is
neutral, where a fresh customer's baseline starts; scores all above 0 would first reinforce every
answer, bad ones too: measured, hooli's first two versions scored 0.00 on the gate), so that customer learns from rewards alone (the trainer's
`importance` path at the agents' temperature). Like a support lead with a knowledge base, the
operator writes a correction's content from a reference answer to the question (when given one),
not from the answer under review: fixing up an answer that is already drifting would teach the
drift (measured: content collapsed to "- a\n- a" in 8 steps).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from clora.agents.envs import Completion
from clora.agents.preference import PreferenceEnv, Rule
from clora.wire.feedback import FeedbackEvent


@dataclass
class Exchange:
    customer: str
    messages: list[dict[str, Any]]
    answer: str
    trace_id: str
    finish_reason: str | None


class SimulatedCustomer:
    def __init__(self, name: str, rule_spec: str, api_key: str, gateway_url: str, seed: int = 0):
        self.name, self.env = name, PreferenceEnv(rule_spec)
        self.rng = random.Random(seed)
        self.client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, timeout=600, max_retries=3)

    @property
    def rule(self) -> Rule:
        return self.env.rule

    async def ask(self, n: int, max_tokens: int = 64, temperature: float = 0.7) -> list[Exchange]:
        """`n` questions at once, like concurrent conversations of the customer's agent."""
        prompts = self.env.prompts(self.rng, n)
        return list(await asyncio.gather(*[self._ask(p, max_tokens, temperature) for p in prompts]))

    async def _ask(self, messages, max_tokens: int, temperature: float) -> Exchange:
        raw = await self.client.chat.completions.with_raw_response.create(
            model="default", messages=messages, max_tokens=max_tokens, temperature=temperature)
        choice = raw.parse().choices[0]
        return Exchange(self.name, messages, choice.message.content or "",
                        raw.headers["x-clora-trace-id"], choice.finish_reason)

    async def close(self) -> None:
        await self.client.close()


class SimulatedOperator:
    def __init__(self, gateway_url: str, operator_key: str,
                 reference: Callable[[list[dict[str, Any]]], Awaitable[str]] | None = None):
        self.http = httpx.AsyncClient(base_url=gateway_url, headers={"Authorization": f"Bearer {operator_key}"},
                                      timeout=60)
        self.reference = reference
        self._references: dict[str, str] = {}

    async def content_for(self, exchange: Exchange) -> str:
        """What a good answer to the question says (cached per question), or the answer itself."""
        if self.reference is None:
            return exchange.answer
        question = exchange.messages[-1]["content"]
        if question not in self._references:
            self._references[question] = await self.reference(exchange.messages)
        return self._references[question]

    async def review(self, exchange: Exchange, env: PreferenceEnv, corrects: bool = True) -> FeedbackEvent:
        """Thumbs up for a good answer, else thumbs down with a correction; or, for an operator who
        never corrects, the answer's rubric score as a reward."""
        answer = Completion(exchange.answer, [], exchange.finish_reason)
        if not corrects:  # the rubric's 0..1 on the feedback's scale, -1..1 with 0 neutral (as ratings: +1/-1)
            return FeedbackEvent(trace_id=exchange.trace_id, reward=2 * env.rubric(exchange.messages, answer) - 1,
                                 source="operator")
        if env.reward(exchange.messages, answer):
            return FeedbackEvent(trace_id=exchange.trace_id, rating="up", source="operator")
        rule = env.rule
        corrected = rule.apply(await self.content_for(exchange))
        return FeedbackEvent(trace_id=exchange.trace_id, rating="down", source="operator",
                             correction={"role": "assistant", "content": corrected},
                             comment=f"house rule: {rule.description}")

    async def send(self, events: list[FeedbackEvent]) -> list[str]:
        """One webhook batch; returns the accepted event ids (the broker has them on 202). Each event
        gets its id here, so a batch retried after a dropped connection or a 503 (the answer may
        have been lost after the broker took it) is applied once."""
        events = [e if e.event_id else e.model_copy(update={"event_id": uuid.uuid4().hex}) for e in events]
        body = {"events": [e.model_dump(exclude_none=True) for e in events]}
        async for attempt in AsyncRetrying(retry=retry_if_exception(_transient), stop=stop_after_attempt(4),
                                           wait=wait_exponential(multiplier=0.5, max=4), reraise=True):
            with attempt:
                resp = await self.http.post("/v1/feedback", json=body)
                resp.raise_for_status()
        return resp.json()["event_ids"]

    async def close(self) -> None:
        await self.http.aclose()


def _transient(exc: BaseException) -> bool:
    """A connection that dropped (an idle keep-alive connection the server closed as the request
    went out) or a broker that was not ready (503)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 503
    return isinstance(exc, httpx.TransportError)
