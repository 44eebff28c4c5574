"""Adapter versions: immutable files on disk plus a record in Redis; routes customer -> version.

A version is never modified and its name (`<customer>.v<N>`) is never reused, so the engine can
never serve stale prefix-cache blocks from an in-place reload under the same name.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import BaseModel


class AdapterVersion(BaseModel):
    name: str
    customer: str
    version: int
    path: str
    created_at: float
    source: str = "manual"


class AdapterRegistry:
    def __init__(self, redis: aioredis.Redis, adapters_dir: Path, keep_versions: int | None = None):
        self.redis = redis
        self.adapters_dir = adapters_dir
        self.keep_versions = keep_versions  # None: keep every version
        self._versions: dict[str, AdapterVersion] = {}  # immutable, so safe to cache forever

    async def register(self, customer: str, source: Path, origin: str = "manual") -> AdapterVersion:
        """Copy the adapter into the store under a new version number (temp dir, then rename)."""
        number = int(await self.redis.incr(f"clora:adapter-seq:{customer}"))
        target = self.adapters_dir / customer / f"v{number}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        tmp.chmod(0o755)
        tmp.rename(target)
        version = AdapterVersion(name=f"{customer}.v{number}", customer=customer, version=number,
                                 path=str(target.resolve()), created_at=time.time(), source=origin)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"clora:adapter:{version.name}", version.model_dump_json())
            pipe.zadd(f"clora:adapter-versions:{customer}", {version.name: number})
            await pipe.execute()
        self._versions[version.name] = version
        await self.prune(customer)
        return version

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
                pipe.delete(f"clora:adapter:{name}")
                await pipe.execute()
            self._versions.pop(name, None)
            if version is not None:
                shutil.rmtree(version.path, ignore_errors=True)
        return doomed

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
        if name is None:  # back to the base model
            await self.redis.hdel("clora:routes", customer)
        else:
            await self.redis.hset("clora:routes", customer, name)

    async def routes(self) -> dict[str, AdapterVersion]:
        raw = await self.redis.hgetall("clora:routes")
        table = {}
        for customer, name in raw.items():
            version = await self.get(name.decode())
            if version is not None:
                table[customer.decode()] = version
        return table
