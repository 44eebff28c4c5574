"""The audit log of admin actions: who changed what, when (a capped Redis list, newest first)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from clora.wire.admin import AuditEntry

KEY = "clora:audit"
KEEP = 100_000


class AuditLog:
    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def record(self, action: str, customer: str | None = None, actor: str = "admin", **detail: Any) -> None:
        entry = AuditEntry(actor=actor, action=action, customer=customer, detail=detail)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(KEY, entry.model_dump_json())
            pipe.ltrim(KEY, 0, KEEP - 1)
            await pipe.execute()

    async def recent(self, last: int = 50, customer: str | None = None) -> list[AuditEntry]:
        raw = await self.redis.lrange(KEY, 0, (last if customer is None else KEEP) - 1)
        entries = [AuditEntry.model_validate_json(r) for r in raw]
        return [e for e in entries if customer is None or e.customer == customer][:last]
