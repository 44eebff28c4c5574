"""Customers and their API keys, in Redis. Only a SHA-256 of each key is stored."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

import redis.asyncio as aioredis
from pydantic import BaseModel

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_PREFIX = "sk-clora-"
OPERATOR_PREFIX = "sk-clora-op-"
CACHE_TTL_S = 10.0  # a revoked key stops working within this long


class Customer(BaseModel):
    name: str
    created_at: float


class Operator(BaseModel):
    """A person or system that may send feedback for a set of customers."""

    name: str
    customers: list[str]
    digest: str | None = None  # of its key (listed operators only: how `revoke_operator` finds it)


class InvalidName(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class CustomerStore:
    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def create(self, name: str) -> str:
        """Registers a customer and returns its first API key (shown once, never stored)."""
        if not NAME_RE.match(name):
            raise InvalidName(f"customer name {name!r}: use 1-63 of a-z 0-9 _ - (start with a letter or digit)")
        record = Customer(name=name, created_at=time.time())
        created = await self.redis.hsetnx("clora:customers", name, record.model_dump_json())
        if not created:
            raise InvalidName(f"customer {name!r} already exists")
        return await self.issue_key(name)

    async def issue_key(self, name: str) -> str:
        if not await self.exists(name):
            raise KeyError(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"clora:apikey:{digest}", name)
            pipe.sadd(f"clora:customer-keys:{name}", digest)
            await pipe.execute()
        return key

    async def revoke_keys(self, name: str) -> int:
        digests = await self.redis.smembers(f"clora:customer-keys:{name}")
        if digests:
            await self.redis.delete(*[f"clora:apikey:{d.decode()}" for d in digests],
                                    f"clora:customer-keys:{name}")
        self._cache.clear()
        return len(digests)

    async def delete(self, name: str) -> bool:
        """The customer and its keys (its agents get 401 at once in this process)."""
        await self.revoke_keys(name)
        return bool(await self.redis.hdel("clora:customers", name))

    async def exists(self, name: str) -> bool:
        return bool(await self.redis.hexists("clora:customers", name))

    async def list(self) -> list[Customer]:
        raw = await self.redis.hgetall("clora:customers")
        return sorted((Customer.model_validate_json(v) for v in raw.values()), key=lambda c: c.name)

    async def authenticate(self, key: str) -> str | None:
        """Customer owning the key, or None. Cached briefly: auth must not cost a round trip."""
        if not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        raw = await self.redis.get(f"clora:apikey:{digest}")
        customer = raw.decode() if raw else None
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[digest] = (now + CACHE_TTL_S, customer)
        return customer

    async def create_operator(self, name: str, customers: list[str]) -> str:
        """An operator key scoped to existing customers; returns the key (shown once)."""
        if not NAME_RE.match(name):
            raise InvalidName(f"operator name {name!r}: use 1-63 of a-z 0-9 _ -")
        missing = [c for c in customers if not await self.exists(c)]
        if missing or not customers:
            raise InvalidName(f"operator scope must name existing customers (unknown: {missing})")
        key = OPERATOR_PREFIX + secrets.token_urlsafe(32)
        operator = Operator(name=name, customers=sorted(set(customers)))
        listed = operator.model_copy(update={"digest": hash_key(key)})
        if not await self.redis.hsetnx("clora:operators", name, listed.model_dump_json()):
            raise InvalidName(f"operator {name!r} already exists")
        await self.redis.set(f"clora:operator-key:{hash_key(key)}", operator.model_dump_json())
        return key

    async def operators(self) -> list[Operator]:
        raw = await self.redis.hgetall("clora:operators")
        return sorted((Operator.model_validate_json(v) for v in raw.values()), key=lambda o: o.name)

    async def revoke_operator(self, name: str) -> bool:
        raw = await self.redis.hget("clora:operators", name)
        if raw is None:
            return False
        operator = Operator.model_validate_json(raw)
        await self.redis.delete(f"clora:operator-key:{operator.digest}")
        await self.redis.hdel("clora:operators", name)
        return True

    async def key_count(self, name: str) -> int:
        return int(await self.redis.scard(f"clora:customer-keys:{name}"))

    async def authenticate_operator(self, key: str) -> Operator | None:
        if not key.startswith(OPERATOR_PREFIX):
            return None
        raw = await self.redis.get(f"clora:operator-key:{hash_key(key)}")
        return Operator.model_validate_json(raw) if raw else None
