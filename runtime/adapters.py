"""Adapter versions: immutable files on disk plus a record in Redis; routes customer -> version.

A version is never modified and its name (`<customer>.v<N>`) is never reused, so the engine can
never serve stale prefix-cache blocks from an in-place reload under the same name. A version that
has been served (promoted: published live, or switched to by the gate or an operator) stays
callable by its name; one that never was is a candidate, reachable only through the admin API.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from clora.wire.admin import AdapterVersion

PROMOTED = "clora:adapter-promoted"  # names of every version ever served
ROUTES_CHANGED = "clora:routes:changed"  # pub/sub channel: a customer whose route was set
IDEMPOTENCY_TTL_S = 24 * 3600  # a publish retried within a day with the same key returns the same version


def _idempotency(customer: str, key: str) -> str:
    return f"clora:publish-key:{customer}:{key}"


def _copy_adapter(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
    tmp.chmod(0o755)
    tmp.rename(target)


class AdapterRegistry:
    def __init__(self, redis: aioredis.Redis, adapters_dir: Path, keep_versions: int | None = None):
        self.redis = redis
        self.adapters_dir = adapters_dir
        self.keep_versions = keep_versions  # None: keep every version
        self._versions: dict[str, AdapterVersion] = {}  # immutable, so safe to cache forever

    async def stage(self, customer: str, source: Path, origin: str = "manual") -> AdapterVersion:
        """The next version's number and files (temp dir, then rename; copied off the event loop),
        not yet registered: nobody can find it until `commit`."""
        number = int(await self.redis.incr(f"clora:adapter-seq:{customer}"))
        target = self.adapters_dir / customer / f"v{number}"
        await asyncio.to_thread(_copy_adapter, source, target)
        return AdapterVersion(name=f"{customer}.v{number}", customer=customer, version=number,
                              path=str(target.resolve()), created_at=time.time(), source=origin)

    async def commit(self, version: AdapterVersion, idempotency_key: str | None = None) -> AdapterVersion:
        """Register a staged version (and the publish request that made it), then prune old ones."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"clora:adapter:{version.name}", version.model_dump_json())
            pipe.zadd(f"clora:adapter-versions:{version.customer}", {version.name: version.version})
            if idempotency_key is not None:
                pipe.set(_idempotency(version.customer, idempotency_key), version.name, ex=IDEMPOTENCY_TTL_S)
            await pipe.execute()
        self._versions[version.name] = version
        await self.prune(version.customer)
        return version

    async def discard(self, version: AdapterVersion) -> None:
        """A staged version that will not be committed (its number is never reused)."""
        await asyncio.to_thread(shutil.rmtree, version.path, True)

    async def register(self, customer: str, source: Path, origin: str = "manual") -> AdapterVersion:
        """Stage and commit at once (no engine involved)."""
        return await self.commit(await self.stage(customer, source, origin))

    async def published_as(self, customer: str, idempotency_key: str) -> AdapterVersion | None:
        """The version an earlier publish with this key made (None: no such publish, or forgotten)."""
        name = await self.redis.get(_idempotency(customer, idempotency_key))
        return await self.get(name.decode()) if name is not None else None

    async def prune(self, customer: str) -> list[str]:
        """Delete versions older than the newest `keep_versions`, never the one being served nor a
        pinned one (rollback targets). Returns the names deleted."""
        if self.keep_versions is None:
            return []
        names = [n.decode() for n in await self.redis.zrange(f"clora:adapter-versions:{customer}", 0, -1)]
        current = await self.redis.hget("clora:routes", customer)
        kept = {n.decode() for n in await self.redis.smembers(f"clora:adapter-pinned:{customer}")}
        kept |= {current.decode()} if current is not None else set()
        doomed = [n for n in names[:-self.keep_versions] if n not in kept]
        for name in doomed:
            version = await self.get(name)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(f"clora:adapter-versions:{customer}", name)
                pipe.srem(PROMOTED, name)
                pipe.delete(f"clora:adapter:{name}")
                await pipe.execute()
            self._versions.pop(name, None)
            if version is not None:
                await asyncio.to_thread(shutil.rmtree, version.path, True)
        return doomed

    async def delete_customer(self, customer: str) -> list[str]:
        """Every version of the customer, its route, pins, sequence and files; returns the names."""
        names = [n.decode() for n in await self.redis.zrange(f"clora:adapter-versions:{customer}", 0, -1)]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel("clora:routes", customer)
            for key in ("adapter-versions", "adapter-pinned", "adapter-seq"):
                pipe.delete(f"clora:{key}:{customer}")
            if names:
                pipe.srem(PROMOTED, *names)
                pipe.delete(*[f"clora:adapter:{n}" for n in names])
            pipe.publish(ROUTES_CHANGED, customer)
            await pipe.execute()
        for name in names:
            self._versions.pop(name, None)
        await asyncio.to_thread(shutil.rmtree, self.adapters_dir / customer, True)
        return names

    async def pin(self, customer: str, names: list[str], keep: bool = True) -> None:
        """Keep (or stop keeping) versions through pruning, whatever their age."""
        if names:
            key = f"clora:adapter-pinned:{customer}"
            await (self.redis.sadd(key, *names) if keep else self.redis.srem(key, *names))

    async def pinned(self, customer: str) -> list[str]:
        return sorted(n.decode() for n in await self.redis.smembers(f"clora:adapter-pinned:{customer}"))

    async def get(self, name: str) -> AdapterVersion | None:
        if name in self._versions:
            return self._versions[name]
        raw = await self.redis.get(f"clora:adapter:{name}")
        if raw is None:
            return None
        version = AdapterVersion.model_validate_json(raw)
        self._versions[name] = version
        return version

    async def versions(self, customer: str) -> list[AdapterVersion]:
        names = await self.redis.zrange(f"clora:adapter-versions:{customer}", 0, -1)
        found = [await self.get(n.decode()) for n in names]
        return [v for v in found if v is not None]

    async def set_current(self, customer: str, name: str | None) -> None:
        """Route the customer to a version (which is promoted from now on), or to the base model;
        every gateway on this Redis hears of it (`ROUTES_CHANGED`)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if name is None:
                pipe.hdel("clora:routes", customer)
            else:
                pipe.hset("clora:routes", customer, name)
                pipe.sadd(PROMOTED, name)
            pipe.publish(ROUTES_CHANGED, customer)
            await pipe.execute()

    async def current(self, customer: str) -> AdapterVersion | None:
        """The version the customer is routed to, as Redis says now (None: the base model)."""
        name = await self.redis.hget("clora:routes", customer)
        return await self.get(name.decode()) if name is not None else None

    async def promoted(self) -> set[str]:
        """Every version that has been served; a version routed before promotion was recorded counts."""
        routed = [n.decode() for n in await self.redis.hvals("clora:routes")]
        if routed:
            await self.redis.sadd(PROMOTED, *routed)
        return {n.decode() for n in await self.redis.smembers(PROMOTED)}

    async def routes(self) -> dict[str, AdapterVersion]:
        raw = await self.redis.hgetall("clora:routes")
        table = {}
        for customer, name in raw.items():
            version = await self.get(name.decode())
            if version is not None:
                table[customer.decode()] = version
        return table
