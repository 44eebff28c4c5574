"""The periodic eval job: per customer with a suite, score the served version and the newest
candidate, and let the promotion gate decide; manual promote and rollback go through here too.

It talks to the runtime only through the gateway's admin API, like the trainer: versions are
listed and routes switched there, and answers come from the admin chat endpoint.
"""

from __future__ import annotations

import asyncio
import logging

import openai
import redis.asyncio as aioredis

from clora.core.admin_client import RuntimeClient
from clora.core.settings import EvalSettings
from clora.evals.gate import Best, Decision, EvalHistory, PromotionGate
from clora.evals.scoring import EvalScore, SharedAnswers, admin_chat_client, greedy_chat, score
from clora.evals.suites import EvalSuite, SuiteStore

log = logging.getLogger("clora.evals")


class EvalJob:
    def __init__(self, admin: RuntimeClient, suites: SuiteStore, history: EvalHistory,
                 gate: PromotionGate, gateway_url: str, admin_key: str, base_name: str = "base"):
        self.admin, self.suites, self.history = admin, suites, history
        self.gate, self.base_name = gate, base_name
        self.gateway_url, self.admin_key = gateway_url, admin_key
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self.base_answers = SharedAnswers()  # the base model answers a question once for every customer

    def client(self, customer: str) -> openai.AsyncOpenAI:
        if customer not in self._clients:
            self._clients[customer] = admin_chat_client(self.gateway_url, self.admin_key, customer)
        return self._clients[customer]

    async def close(self) -> None:
        await self.admin.close()
        for client in self._clients.values():
            await client.close()

    # -- scoring ---------------------------------------------------------------------------------------
    async def score(self, customer: str, suite: EvalSuite, version: str | None) -> EvalScore:
        """A version's score on the suite (None: the base model); cached, versions never change."""
        name = version or self.base_name
        cached = await self.history.cached_score(f"{customer}/{name}", suite.fingerprint())
        if cached is not None:
            return cached
        client = self.client(customer)
        chat = self.base_answers.chat(greedy_chat(client)) if version is None else None
        result = await score(client, suite, name, chat)
        result.adapter = f"{customer}/{name}"  # the base model's score differs per customer's suite
        await self.history.cache_score(result)
        return result

    async def candidate(self, customer: str) -> tuple[str | None, str | None]:
        """(served version, newest version newer than it that the gate has not decided on yet)."""
        listed = await self.admin.versions(customer)
        current = listed.current
        numbers = {v.name: v.version for v in listed.versions}
        await self.history.prune_scores(customer, {*numbers, self.base_name})  # versions pruned meanwhile
        floor = numbers.get(current, 0) if current else 0
        newer = sorted((n for n, number in numbers.items() if number > floor), key=numbers.get)
        if not newer or await self.history.decided(customer, newer[-1]):
            return current, None
        return current, newer[-1]

    # -- the gate --------------------------------------------------------------------------------------
    async def evaluate(self, customer: str) -> Decision | None:
        """Score the served version and the newest candidate; promote or hold it back."""
        suite = await self.suites.get(customer)
        if suite is None:
            return None
        current, candidate = await self.candidate(customer)
        if candidate is None:
            return None
        current_score, candidate_score = await asyncio.gather(self.score(customer, suite, current),
                                                              self.score(customer, suite, candidate))
        fingerprint = suite.fingerprint()
        best = await self.history.best(customer, fingerprint)
        if best is None:  # the first decision on this suite: the served version sets the bar
            best = Best(version=current, score=current_score.score)
            await self.history.set_best(customer, fingerprint, best)
        decision = self.gate.decide(customer, current_score, candidate_score, current, candidate, best)
        if decision.action == "promoted":
            await self._serve(customer, current, candidate)
            if candidate_score.score > best.score:
                await self.history.set_best(customer, fingerprint, Best(version=candidate, score=candidate_score.score))
        await self.history.append(decision)
        log.info("customer %s: %s %s (%s)", customer, decision.action, candidate, decision.reason)
        return decision

    async def run_once(self) -> list[Decision]:
        customers = list(await self.suites.all())
        decisions = []
        for customer in customers:  # one at a time: each already fills the engine's batch
            try:
                decision = await self.evaluate(customer)
            except Exception:  # noqa: BLE001 - one customer's failing eval must not stop the others
                log.exception("customer %s: eval failed", customer)
                continue
            decisions += [decision] if decision else []
        return decisions

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """A round every `interval_s` seconds (the first after one interval) until `stop` is set."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
                return
            except asyncio.TimeoutError:
                await self.run_once()

    @classmethod
    def connect(cls, redis: aioredis.Redis, gateway_url: str, admin_key: str, evals: EvalSettings,
                served_base: str) -> "EvalJob":
        """The job wired to a running runtime's Redis and gateway."""
        return cls(RuntimeClient(gateway_url, admin_key), SuiteStore(redis), EvalHistory(redis),
                   PromotionGate(evals.tolerance), gateway_url, admin_key, served_base)

    # -- manual ----------------------------------------------------------------------------------------
    async def promote(self, customer: str, version: str, reason: str = "manual") -> Decision:
        """Serve `version` now, bypassing the gate (its score is recorded when a suite exists)."""
        current = (await self.admin.versions(customer)).current
        suite = await self.suites.get(customer)
        scores = await asyncio.gather(self.score(customer, suite, current), self.score(customer, suite, version)) \
            if suite else (None, None)
        await self._serve(customer, current, version)
        decision = Decision(customer=customer, action="manual-promote", current=current, candidate=version,
                            current_score=scores[0].score if scores[0] else None,
                            candidate_score=scores[1].score if scores[1] else None, reason=reason)
        await self.history.append(decision)
        return decision

    async def rollback(self, customer: str, reason: str = "manual") -> Decision:
        """Serve again the version promoted before the current one (the base model if none)."""
        popped = await self.history.pop_served(customer)
        if popped is None:
            raise LookupError(f"customer {customer!r} has no earlier promoted version to roll back to")
        undone, target = popped
        await self.admin.route(customer, target)
        decision = Decision(customer=customer, action="rollback", current=undone, candidate=target, reason=reason)
        await self.history.append(decision)
        return decision

    async def _serve(self, customer: str, current: str | None, version: str) -> None:
        if not await self.history.promotions(customer):  # the first: what was served before is a rollback target
            await self.history.push_served(customer, current)
        dropped = await self.history.push_served(customer, version)
        await self.admin.pin(customer, [v for v in (current, version) if v], unpin=dropped)
        await self.admin.route(customer, version)
