"""Per-customer replay buffers in Redis: the trainer's only way to get data.

Per customer: records (hash event_id -> JSON), insertion order (zset), eviction order (zset whose
score puts plain ratings before rewards before corrections, oldest first within a kind), applied
event ids (keys with a TTL, so a redelivered event is never stored twice), which adapter versions
consumed each record, and counters. A push is one Lua script: idempotent and atomic.
"""

from __future__ import annotations

import random
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel

from feedback.records import Kind, TrainingRecord

Policy = Literal["recent", "uniform", "prioritized"]
KIND_RANK: dict[Kind, int] = {"comment": 0, "rating": 1, "reward": 2, "correction": 3}
SEEN_TTL_S = 7 * 24 * 3600

# KEYS: records, order, evict, seen-key, stats, seq.  ARGV: event_id, json, kind_rank, capacity, ttl, kind.
_PUSH = """
if redis.call('SET', KEYS[4], 1, 'NX', 'EX', ARGV[5]) == false then
  redis.call('HINCRBY', KEYS[5], 'duplicates', 1)
  return -1
end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) * 1e12 + seq, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'pushed', 1)
redis.call('HINCRBY', KEYS[5], 'kind:' .. ARGV[6], 1)
local evicted = 0
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4]) do
  local victim = redis.call('ZPOPMIN', KEYS[3])[1]
  redis.call('ZREM', KEYS[2], victim)
  local raw = redis.call('HGET', KEYS[1], victim)
  redis.call('HDEL', KEYS[1], victim)
  redis.call('HDEL', KEYS[1] .. ':consumed', victim)
  redis.call('HINCRBY', KEYS[5], 'evicted', 1)
  evicted = evicted + 1
end
return evicted
"""


class ReplayStats(BaseModel):
    customer: str
    size: int
    capacity: int
    pushed: int
    duplicates: int
    evicted: int
    by_kind: dict[str, int]
    consumed: int


class ReplayBuffer:
    def __init__(self, redis: aioredis.Redis, default_capacity: int = 10_000):
        self.redis = redis
        self.default_capacity = default_capacity
        self._push = redis.register_script(_PUSH)

    @staticmethod
    def _keys(customer: str) -> dict[str, str]:
        root = f"clora:rb:{{{customer}}}"  # hash tag: one customer's keys share a cluster slot
        return {"records": f"{root}:records", "order": f"{root}:order", "evict": f"{root}:evict",
                "stats": f"{root}:stats", "seq": f"{root}:seq", "consumed": f"{root}:records:consumed"}

    async def capacity(self, customer: str) -> int:
        raw = await self.redis.hget("clora:rb-quota", customer)
        return int(raw) if raw else self.default_capacity

    async def set_quota(self, customer: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        await self.redis.hset("clora:rb-quota", customer, capacity)

    async def push(self, record: TrainingRecord) -> bool:
        """Store a record once; False if its event id was already applied (a redelivery)."""
        k = self._keys(record.customer)
        seen = f"clora:rb:{{{record.customer}}}:seen:{record.event_id}"
        result = await self._push(
            keys=[k["records"], k["order"], k["evict"], seen, k["stats"], k["seq"]],
            args=[record.event_id, record.model_dump_json(), KIND_RANK[record.kind],
                  await self.capacity(record.customer), SEEN_TTL_S, record.kind])
        return int(result) >= 0

    async def _load(self, customer: str, event_ids: list[str]) -> list[TrainingRecord]:
        if not event_ids:
            return []
        raw = await self.redis.hmget(self._keys(customer)["records"], event_ids)
        return [TrainingRecord.model_validate_json(r) for r in raw if r is not None]

    async def sample(self, customer: str, n: int, policy: Policy = "recent",
                     rng: random.Random | None = None) -> list[TrainingRecord]:
        """Up to n distinct records: newest first, uniformly, or weighted by training signal."""
        k = self._keys(customer)
        if policy == "recent":
            ids = await self.redis.zrevrange(k["order"], 0, n - 1)
        elif policy == "uniform":
            ids = await self.redis.zrandmember(k["order"], n) or []
        elif policy == "prioritized":
            ids = await self._prioritized(k["evict"], n, rng or random.Random())
        else:
            raise ValueError(f"unknown sampling policy {policy!r}")
        return await self._load(customer, [i.decode() if isinstance(i, bytes) else i for i in ids])

    async def _prioritized(self, evict_key: str, n: int, rng: random.Random) -> list[bytes]:
        """Weight = 1 + kind rank: corrections 4x as likely as comments; without replacement."""
        scored = await self.redis.zrange(evict_key, 0, -1, withscores=True)
        pool = [(member, 1.0 + score // 1e12) for member, score in scored]
        chosen = []
        for _ in range(min(n, len(pool))):
            pick = rng.uniform(0, sum(w for _, w in pool))
            for i, (member, weight) in enumerate(pool):
                pick -= weight
                if pick <= 0 or i == len(pool) - 1:
                    chosen.append(member)
                    pool.pop(i)
                    break
        return chosen

    async def mark_consumed(self, customer: str, event_ids: list[str], adapter_version: str) -> None:
        """Record that a training step for `adapter_version` used these records."""
        key = self._keys(customer)["consumed"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id in event_ids:
                pipe.hget(key, event_id)
            previous = await pipe.execute()
        updates = {e: ",".join(filter(None, [(p or b"").decode(), adapter_version]))
                   for e, p in zip(event_ids, previous)}
        if updates:
            await self.redis.hset(key, mapping=updates)

    async def consumed_by(self, customer: str, event_id: str) -> list[str]:
        raw = await self.redis.hget(self._keys(customer)["consumed"], event_id)
        return raw.decode().split(",") if raw else []

    async def stats(self, customer: str) -> ReplayStats:
        k = self._keys(customer)
        raw = {key.decode(): int(v) for key, v in (await self.redis.hgetall(k["stats"])).items()}
        return ReplayStats(
            customer=customer, size=await self.redis.zcard(k["order"]), capacity=await self.capacity(customer),
            pushed=raw.get("pushed", 0), duplicates=raw.get("duplicates", 0), evicted=raw.get("evicted", 0),
            by_kind={key[5:]: v for key, v in raw.items() if key.startswith("kind:")},
            consumed=await self.redis.hlen(k["consumed"]))
