"""The promotion gate and the record of what it decided.

A candidate version is served only if its eval score is not worse than the current version's by
more than a tolerance, nor worse than the best score the gate ever served (the first served
version's, usually the base model's, then every promoted one's) by more than the tolerance:
otherwise a run of candidates each within tolerance of the last could drift down without end.
Otherwise it is held back. Every decision, automatic or manual, is appended
to the customer's eval history in Redis, and the versions that were promoted form a stack that
rollback pops (they are pinned so that version pruning keeps them).
"""

from __future__ import annotations

import time
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from clora.evals.scoring import EvalScore

Action = Literal["promoted", "held-back", "manual-promote", "rollback", "baseline"]
BASE = ""  # the base model in the promotion stack
STACK_DEPTH = 10  # promoted versions kept as rollback targets


class Decision(BaseModel):
    customer: str
    action: Action
    current: str | None = Field(description="Version served before the decision (None: base model).")
    candidate: str | None = Field(description="Version decided on (None: base model).")
    current_score: float | None = None
    candidate_score: float | None = None
    best: str | None = Field(default=None, description="The best version the gate served on this suite.")
    best_score: float | None = None
    tolerance: float | None = None
    reason: str
    at: float = Field(default_factory=time.time)


class PromotionGate:
    def __init__(self, tolerance: float = 0.05):
        if not 0 <= tolerance <= 1:
            raise ValueError("tolerance must lie in [0, 1]")
        self.tolerance = tolerance

    def decide(self, customer: str, current: EvalScore, candidate: EvalScore,
               current_name: str | None, candidate_name: str, best: Best | None = None) -> Decision:
        """Promote unless the candidate is below the served version, or below the best ever served,
        by more than the tolerance (float noise is not a regression)."""
        best = best or Best(version=current_name, score=current.score)
        below_current = candidate.score < current.score - self.tolerance - 1e-9
        below_best = candidate.score < best.score - self.tolerance - 1e-9
        delta = candidate.score - current.score
        reason = f"{candidate.score:.3f} vs {current.score:.3f} ({delta:+.3f})"
        if below_current:
            reason += f"; beyond tolerance {self.tolerance:.3f}"
        elif below_best:
            reason += (f"; within tolerance {self.tolerance:.3f} of the served version but "
                       f"{candidate.score - best.score:+.3f} below the best served ({best.version or 'base'}, "
                       f"{best.score:.3f})")
        else:
            reason += f"; within tolerance {self.tolerance:.3f}"
        promote = not (below_current or below_best)
        return Decision(customer=customer, action="promoted" if promote else "held-back", current=current_name,
                        candidate=candidate_name, current_score=current.score, candidate_score=candidate.score,
                        best=best.version, best_score=best.score, tolerance=self.tolerance, reason=reason)


class Best(BaseModel):
    """The best-scoring version the gate has served on a suite (None: the base model)."""

    version: str | None
    score: float


class EvalHistory:
    """Per customer: decisions (a list), decided versions (a set), promotion stack (a list), and
    cached scores per (version, suite) (a hash; greedy answers of an immutable version do not change)."""

    def __init__(self, redis: aioredis.Redis, keep: int = 1000):
        self.redis, self.keep = redis, keep

    async def append(self, decision: Decision) -> None:
        key = f"clora:eval:history:{decision.customer}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, decision.model_dump_json())
            pipe.ltrim(key, -self.keep, -1)
            if decision.candidate is not None and decision.action in ("promoted", "held-back"):
                pipe.sadd(f"clora:eval:decided:{decision.customer}", decision.candidate)
            await pipe.execute()

    async def decisions(self, customer: str, last: int = 100) -> list[Decision]:
        raw = await self.redis.lrange(f"clora:eval:history:{customer}", -last, -1)
        return [Decision.model_validate_json(r) for r in raw]

    async def decided(self, customer: str, version: str) -> bool:
        return bool(await self.redis.sismember(f"clora:eval:decided:{customer}", version))

    async def best(self, customer: str, suite: str) -> Best | None:
        raw = await self.redis.hget(f"clora:eval:best:{customer}", suite)
        return Best.model_validate_json(raw) if raw else None

    async def set_best(self, customer: str, suite: str, best: Best) -> None:
        await self.redis.hset(f"clora:eval:best:{customer}", suite, best.model_dump_json())

    async def cached_score(self, version: str, suite: str) -> EvalScore | None:
        raw = await self.redis.hget("clora:eval:scores", f"{version}|{suite}")
        return EvalScore.model_validate_json(raw) if raw else None

    async def cache_score(self, score: EvalScore) -> None:
        await self.redis.hset("clora:eval:scores", f"{score.adapter}|{score.suite}", score.model_dump_json())

    async def prune_scores(self, customer: str, keep: set[str]) -> int:
        """Cached scores of the customer's versions not in `keep` (pruned from the registry)."""
        doomed = [field async for field, _ in self.redis.hscan_iter("clora:eval:scores", match=f"{customer}/*")
                  if field.decode().split("|")[0].split("/", 1)[1] not in keep]
        if doomed:
            await self.redis.hdel("clora:eval:scores", *doomed)
        return len(doomed)

    async def delete(self, customer: str) -> int:
        """Everything of the customer: decisions, bests, promotion stack, cached scores."""
        scores = [field async for field, _ in self.redis.hscan_iter("clora:eval:scores", match=f"{customer}*")
                  if field.decode().split("|")[0].split("/")[0].split(".v")[0] == customer]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in ("history", "decided", "best", "served"):
                pipe.delete(f"clora:eval:{key}:{customer}")
            if scores:
                pipe.hdel("clora:eval:scores", *scores)
            await pipe.execute()
        return len(scores)

    # -- promotion stack (rollback targets) -----------------------------------------------------------
    async def promotions(self, customer: str) -> int:
        """How many promotions the stack holds (0: the gate never served anything for this customer)."""
        return await self.redis.llen(f"clora:eval:served:{customer}")

    async def push_served(self, customer: str, version: str | None) -> list[str]:
        """Record a promotion; returns versions that fell off the stack (to unpin)."""
        key = f"clora:eval:served:{customer}"
        await self.redis.rpush(key, version or BASE)
        dropped = await self.redis.lrange(key, 0, -STACK_DEPTH - 1)
        await self.redis.ltrim(key, -STACK_DEPTH, -1)
        return [d.decode() for d in dropped if d]

    async def pop_served(self, customer: str) -> tuple[str | None, str | None] | None:
        """Undo the last promotion: (version undone, version to serve again), or None if there is
        no earlier promoted version to go back to."""
        key = f"clora:eval:served:{customer}"
        stack = [s.decode() for s in await self.redis.lrange(key, 0, -1)]
        if len(stack) < 2:
            return None
        await self.redis.rpop(key)
        return stack[-1] or None, stack[-2] or None
