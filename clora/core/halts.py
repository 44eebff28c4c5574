"""Tenants whose training the trainer stopped (`clora:trainer:halted`): written by the trainer
after `CLORA_TRAINER_MAX_SKIPPED_STEPS` steps in a row were skipped (each batch's logprob gap over
the tenant's bound: a trainer/engine mismatch would otherwise discard every batch, one at a time,
in silence), read by `GET /healthz` ("training": degraded, with each tenant's reason). A halt ends
when the tenant's trainer config is set again (the fix, say a bound that fits) or the trainer
restarts (a fixed deployment)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from clora.core.health import ComponentHealth

HEALTH_TIMEOUT_S = 1.0  # /healthz answers within it even when Redis does not


class Halt(BaseModel):
    reason: str  # the last skipped step's
    skipped_steps: int  # in a row
    at: float  # unix seconds


class TrainingHalts:
    KEY = "clora:trainer:halted"

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def halt(self, customer: str, reason: str, skipped_steps: int) -> None:
        await self.redis.hset(self.KEY, customer, Halt(reason=reason, skipped_steps=skipped_steps,
                                                       at=time.time()).model_dump_json())

    async def resume(self, customer: str) -> bool:
        return bool(await self.redis.hdel(self.KEY, customer))

    async def clear(self) -> None:
        await self.redis.delete(self.KEY)

    async def all(self) -> dict[str, Halt]:
        raw = await self.redis.hgetall(self.KEY)
        return {k.decode(): Halt.model_validate_json(v) for k, v in raw.items()}

    async def health(self) -> ComponentHealth:
        """For /healthz: degraded while any tenant is halted (or while Redis cannot say)."""
        try:
            halted = await asyncio.wait_for(self.all(), HEALTH_TIMEOUT_S)
        except (RedisError, asyncio.TimeoutError) as exc:
            return ComponentHealth(state="unknown", ok=False, detail={"error": f"redis: {exc!r}"})
        return ComponentHealth(state="halted" if halted else "ok", ok=not halted,
                               detail={"halted": {c: h.model_dump() for c, h in sorted(halted.items())}})
