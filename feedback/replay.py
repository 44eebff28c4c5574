"""Per-customer replay buffers in Redis: the trainer's only way to get data.

Per customer: records (hash event_id -> JSON), insertion order (zset), eviction order (zset whose
score puts plain ratings before rewards before corrections, oldest first within a kind; a kind at
or under its minimum share of the capacity is passed over, so a buffer full of corrections still
keeps the newest ratings), applied
event ids (a zset pruned after a week, so a redelivered event is never stored twice), which adapter
versions consumed each record, counters, and a quarantine (records a trainer step found too far
from the trainer's logprobs: kept for a look, never trained on). A push is one Lua script per
customer and batch: idempotent and atomic.
"""

from __future__ import annotations

import random
import time
from typing import Literal

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel

from clora.feedback.replay_scripts import PUSH, QUARANTINE
from clora.wire.admin import ReplayEntry, ReplayReport, ReplayStats
from clora.wire.feedback import Kind, SerializedRecord, TrainingRecord

Policy = Literal["recent", "uniform", "prioritized"]
KIND_RANK: dict[Kind, int] = {"comment": 0, "rating": 1, "reward": 2, "correction": 3}
SEEN_TTL_S = 7 * 24 * 3600

class QuarantinedRecord(BaseModel):
    reason: str
    at: float
    record: TrainingRecord


class ReplayBuffer:
    def __init__(self, redis: aioredis.Redis, default_capacity: int = 10_000, min_share: float = 0.1):
        """`min_share`: the share of a buffer's capacity each kind keeps through eviction (the newest
        of its records), whatever the other kinds outrank it by."""
        if not 0 <= min_share <= 0.25:
            raise ValueError("min_share must be within 0..0.25 (four kinds share the capacity)")
        self.redis = redis
        self.default_capacity = default_capacity
        self.min_share = min_share
        self._push = redis.register_script(PUSH)
        self._quarantine = redis.register_script(QUARANTINE)

    @staticmethod
    def _keys(customer: str) -> dict[str, str]:
        root = f"clora:rb:{{{customer}}}"  # hash tag: one customer's keys share a cluster slot
        return {"records": f"{root}:records", "order": f"{root}:order", "evict": f"{root}:evict",
                "stats": f"{root}:stats", "seq": f"{root}:seq", "consumed": f"{root}:records:consumed",
                "seen": f"{root}:seen", "quarantine": f"{root}:quarantine"}

    async def capacity(self, customer: str) -> int:
        raw = await self.redis.hget("clora:rb-quota", customer)
        return int(raw) if raw else self.default_capacity

    async def set_quota(self, customer: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        await self.redis.hset("clora:rb-quota", customer, capacity)

    async def push(self, record: TrainingRecord) -> bool:
        """Store a record once; False if its event id was already applied (a redelivery)."""
        return (await self.push_many([record]))[0]

    async def push_many(self, records: list[TrainingRecord]) -> list[bool]:
        return await self.push_serialized([SerializedRecord(r.customer, r.event_id, r.kind, r.model_dump_json().encode())
                                           for r in records])

    async def push_serialized(self, records: list[SerializedRecord]) -> list[bool]:
        """Push a batch of records as JSON: one script call per customer, one round trip in all.
        Each record is applied once (False: its event id was already applied, a redelivery)."""
        if not records:
            return []
        by_customer: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_customer.setdefault(record.customer, []).append(i)
        customers = list(by_customer)
        quotas = dict(zip(customers, await self.redis.hmget("clora:rb-quota", customers)))
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for customer, indices in by_customer.items():
                k = self._keys(customer)
                capacity = int(quotas[customer] or self.default_capacity)
                meta = [[records[i].event_id, KIND_RANK[records[i].kind], records[i].kind] for i in indices]
                args = [capacity, now, SEEN_TTL_S, int(capacity * self.min_share), orjson.dumps(meta),
                        *(records[i].json for i in indices)]
                await self._push(keys=[k["records"], k["order"], k["evict"], k["seen"], k["stats"], k["seq"]],
                                 args=args, client=pipe)
            replies = await pipe.execute()
        applied = [False] * len(records)
        for indices, reply in zip(by_customer.values(), replies):
            for i, result in zip(indices, reply):
                applied[i] = int(result) >= 0
        return applied

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

    async def newer(self, customer: str, after_seq: int, n: int) -> tuple[list[TrainingRecord], int]:
        """Up to n records pushed after sequence number `after_seq`, oldest first, and the sequence
        number of the last one returned (the caller's cursor)."""
        pairs = await self.redis.zrangebyscore(self._keys(customer)["order"], f"({after_seq}", "+inf",
                                               start=0, num=n, withscores=True)
        if not pairs:
            return [], after_seq
        records = await self._load(customer, [m.decode() for m, _ in pairs])
        return records, int(pairs[-1][1])

    async def delete(self, customer: str) -> int:
        """The customer's buffer, counters, quota and readers' cursors; returns the records dropped."""
        k = self._keys(customer)
        size = int(await self.redis.zcard(k["order"]))
        cursors = [key async for key in self.redis.scan_iter(match=self._cursor_key(customer, "*"))]
        await self.redis.delete(*k.values(), *cursors)
        await self.redis.hdel("clora:rb-quota", customer)
        return size

    async def count_newer(self, customer: str, after_seq: int) -> int:
        return int(await self.redis.zcount(self._keys(customer)["order"], f"({after_seq}", "+inf"))

    async def quarantine(self, customer: str, event_ids: list[str], reason: str) -> int:
        """Moves these records out of the buffer (never sampled again) into its quarantine; returns
        how many were still there to move."""
        if not event_ids:
            return 0
        k = self._keys(customer)
        keys = [k["records"], k["order"], k["evict"], k["consumed"], k["quarantine"]]
        return int(await self._quarantine(keys=keys, args=[repr(time.time()), orjson.dumps(reason).decode(),
                                                           *event_ids]))

    async def quarantined_one(self, customer: str, event_id: str) -> QuarantinedRecord | None:
        raw = await self.redis.hget(self._keys(customer)["quarantine"], event_id)
        return QuarantinedRecord.model_validate_json(raw) if raw is not None else None

    async def record(self, customer: str, event_id: str) -> TrainingRecord | None:
        """The record of this event while it is in the buffer."""
        found = await self._load(customer, [event_id])
        return found[0] if found else None

    async def applied(self, customer: str, event_id: str) -> bool:
        """Whether the event was ever pushed (within `SEEN_TTL_S`), in the buffer now or not."""
        return await self.redis.zscore(self._keys(customer)["seen"], event_id) is not None

    async def quarantined(self, customer: str) -> dict[str, QuarantinedRecord]:
        raw = await self.redis.hgetall(self._keys(customer)["quarantine"])
        return {k.decode(): QuarantinedRecord.model_validate_json(v) for k, v in raw.items()}

    # -- readers' cursors: how far a reader (the trainer) has read a customer's buffer -------------
    @staticmethod
    def _cursor_key(customer: str, reader: str) -> str:
        return f"clora:{reader}:cursor:{customer}"

    async def cursor(self, customer: str, reader: str = "trainer") -> int:
        """Sequence number of the newest record `reader` has taken (0: none yet)."""
        return int(await self.redis.get(self._cursor_key(customer, reader)) or 0)

    async def set_cursor(self, customer: str, seq: int, reader: str = "trainer") -> None:
        await self.redis.set(self._cursor_key(customer, reader), seq)

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
        """One consistent snapshot (MULTI/EXEC over the customer's keys, one cluster slot): read one
        by one, a push landing between the reads showed a size of 2 with no records by kind."""
        k = self._keys(customer)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k["stats"]).zcard(k["order"]).hlen(k["consumed"]).hlen(k["quarantine"])
            counters, size, consumed, quarantined = await pipe.execute()
        raw = {key.decode(): int(v) for key, v in counters.items()}
        return ReplayStats(
            customer=customer, size=size, capacity=await self.capacity(customer),
            pushed=raw.get("pushed", 0), duplicates=raw.get("duplicates", 0), evicted=raw.get("evicted", 0),
            by_kind={key[5:]: v for key, v in raw.items() if key.startswith("kind:")},
            consumed=consumed, quarantined=quarantined)

    async def report(self, customer: str, newest: int = 10) -> ReplayReport:
        """Counters, and the newest records with the versions that trained on them (read after the
        counters: the records shown are at least those counted)."""
        stats = await self.stats(customer)
        records = await self.sample(customer, newest) if newest > 0 else []
        consumed = [await self.consumed_by(customer, r.event_id) for r in records]
        return ReplayReport(stats=stats, newest=[
            ReplayEntry(event_id=r.event_id, trace_id=r.trace_id, kind=r.kind, source=r.source, reward=r.reward,
                        created_at=r.created_at, ingested_at=r.ingested_at, consumed_by=c)
            for r, c in zip(records, consumed)])
