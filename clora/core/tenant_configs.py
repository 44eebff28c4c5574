"""Per-customer training configurations in Redis (`clora:trainer:config`), read by the trainer
and written through the admin API (`PUT /admin/customers/{c}/trainer-config`)."""

from __future__ import annotations

import redis.asyncio as aioredis

from clora.wire.trainer_config import TenantConfig


class TenantConfigStore:
    KEY = "clora:trainer:config"

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def get(self, customer: str) -> TenantConfig | None:
        raw = await self.redis.hget(self.KEY, customer)
        return TenantConfig.model_validate_json(raw) if raw else None

    async def set(self, customer: str, config: TenantConfig) -> None:
        await self.redis.hset(self.KEY, customer, config.model_dump_json())

    async def delete(self, customer: str) -> None:
        await self.redis.hdel(self.KEY, customer)

    async def all(self) -> dict[str, TenantConfig]:
        raw = await self.redis.hgetall(self.KEY)
        return {k.decode(): TenantConfig.model_validate_json(v) for k, v in raw.items()}
