"""Per-customer inference limits: concurrent requests, requests per second, tokens per minute.

Checked after authentication, before any work for the request; each refusal is a 429 with
`Retry-After`. All state is in this process (one gateway per machine); the counters are plain
dictionaries touched only from the event loop, so a check costs microseconds (the gateway's added
p50 is measured by benchmarks/gateway_overhead.py). 0 turns a limit off. A customer may have its
own limits (`LimitOverride`, set through the admin API and kept in Redis by `LimitStore`): the
fields it sets replace the defaults for that customer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from clora.core.http import APIError
from clora.runtime.fair_share import FairShare


@dataclass(frozen=True)
class Limits:
    max_concurrent: int = 64
    requests_per_s: float = 100.0  # sustained; bursts up to 2 s worth
    tokens_per_min: int = 0  # prompt + completion tokens; 0: unlimited


class LimitOverride(BaseModel):
    """A customer's own limits; a field left null keeps the server's default."""

    max_concurrent: int | None = Field(default=None, ge=0)
    requests_per_s: float | None = Field(default=None, ge=0)
    tokens_per_min: int | None = Field(default=None, ge=0)

    def over(self, defaults: Limits) -> Limits:
        return Limits(**{name: getattr(defaults, name) if getattr(self, name) is None else getattr(self, name)
                         for name in ("max_concurrent", "requests_per_s", "tokens_per_min")})


class LimitStore:
    KEY = "clora:limits"

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def all(self) -> dict[str, LimitOverride]:
        raw = await self.redis.hgetall(self.KEY)
        return {k.decode(): LimitOverride.model_validate_json(v) for k, v in raw.items()}

    async def set(self, customer: str, override: LimitOverride) -> None:
        await self.redis.hset(self.KEY, customer, override.model_dump_json())

    async def delete(self, customer: str) -> None:
        await self.redis.hdel(self.KEY, customer)


@dataclass
class _Bucket:
    level: float
    at: float = field(default_factory=time.monotonic)

    def refill(self, rate: float, cap: float) -> None:
        now = time.monotonic()
        self.level = min(cap, self.level + (now - self.at) * rate)
        self.at = now


class CustomerLimits:
    def __init__(self, limits: Limits, fair_share_requests: int = 0):
        self.limits = limits
        self.fair = FairShare(fair_share_requests)  # admitted requests still wait for their share of the engine
        self.own: dict[str, Limits] = {}  # customers with limits of their own
        self.active: dict[str, int] = {}
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def admit(self, customer: str) -> Slot:
        """`check`, then hold a concurrency slot until the slot is released (a stream's at its end);
        the slot enters the engine's fair share at once when it may (else `Slot.wait_turn`)."""
        self.check(customer)
        self.active[customer] = self.active.get(customer, 0) + 1
        return Slot(self, customer, self.fair.try_enter(customer))

    def for_customer(self, customer: str) -> Limits:
        return self.own.get(customer, self.limits)

    def set_own(self, customer: str, override: LimitOverride | None) -> None:
        """From now on (its rate buckets start afresh at the new sizes)."""
        if override is None:
            self.own.pop(customer, None)
        else:
            self.own[customer] = override.over(self.limits)
        self._requests.pop(customer, None)
        self._tokens.pop(customer, None)

    def check(self, customer: str) -> None:
        lim = self.for_customer(customer)
        if lim.max_concurrent and self.active.get(customer, 0) >= lim.max_concurrent:
            raise APIError(429, f"Too many concurrent requests (limit {lim.max_concurrent}); retry when one "
                                "finishes.", "concurrency_limit_exceeded", headers={"Retry-After": "1"})
        if lim.tokens_per_min:
            tokens = self._tokens.setdefault(customer, _Bucket(float(lim.tokens_per_min)))
            tokens.refill(lim.tokens_per_min / 60, lim.tokens_per_min)
            if tokens.level <= 0:
                wait = math.ceil(-tokens.level / (lim.tokens_per_min / 60)) + 1
                raise APIError(429, f"Token rate limit ({lim.tokens_per_min} tokens/min) exceeded.",
                               "token_rate_limit_exceeded", headers={"Retry-After": str(wait)})
        if lim.requests_per_s:
            requests = self._requests.setdefault(customer, _Bucket(2 * lim.requests_per_s))
            requests.refill(lim.requests_per_s, 2 * lim.requests_per_s)
            if requests.level < 1:
                wait = math.ceil((1 - requests.level) / lim.requests_per_s)
                raise APIError(429, f"Request rate limit ({lim.requests_per_s:g}/s) exceeded.",
                               "rate_limit_exceeded", headers={"Retry-After": str(max(1, wait))})
            requests.level -= 1

    def _release(self, customer: str) -> None:
        left = self.active.get(customer, 1) - 1
        if left:
            self.active[customer] = left
        else:
            self.active.pop(customer, None)

    def spend(self, customer: str, tokens: int) -> None:
        """Tokens an answer used (the bucket may go negative: the next requests wait for it)."""
        tokens_per_min = self.for_customer(customer).tokens_per_min
        if tokens_per_min and tokens:
            bucket = self._tokens.setdefault(customer, _Bucket(float(tokens_per_min)))
            bucket.level -= tokens


class Slot:
    """One admitted request's concurrency slot and its place in the engine's fair share: released
    once, by `done`, or when dropped (a stream whose body was never iterated: the client left
    before the first chunk)."""

    def __init__(self, limits: CustomerLimits, customer: str, entered: bool):
        self.limits, self.customer, self.released = limits, customer, False
        self.entered = entered  # holds a place among the requests in the engine

    async def wait_turn(self) -> None:
        """Until the customer's share of the engine lets this request in (at once, usually)."""
        if not self.entered:
            await self.limits.fair.wait_turn(self.customer)
            self.entered = True

    def done(self, tokens: int = 0) -> None:
        if not self.released:
            self.released = True
            self.limits._release(self.customer)
            self.limits.spend(self.customer, tokens)
            if self.entered:
                self.limits.fair.leave(self.customer)

    def __del__(self) -> None:
        self.done()
