"""The adapter version store keeps the last N versions for rollback, never the one being served."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis.asyncio as aioredis

from clora.runtime.adapters import AdapterRegistry


async def test_old_versions_are_pruned_but_never_the_current_one(redis_url, tmp_path):
    # A database of its own: the session's stack restores every route in db 0 at start.
    client = aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9")
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry(client, tmp_path / "adapters", keep_versions=2)
    customer = f"prune-{uuid.uuid4().hex[:6]}"
    try:
        first = await registry.register(customer, source)
        await registry.set_current(customer, first.name)  # served: a rollback target that must stay
        made = [first] + [await registry.register(customer, source) for _ in range(3)]
        kept = [v.name for v in await registry.versions(customer)]
        assert kept == [made[0].name, made[2].name, made[3].name]
        assert not Path(made[1].path).exists() and await registry.get(made[1].name) is None
        assert all(Path(made[i].path).exists() for i in (0, 2, 3))

        await registry.set_current(customer, made[3].name)  # rolled forward: v1 may go now
        await registry.register(customer, source)
        assert [v.version for v in await registry.versions(customer)] == [4, 5]
        assert not Path(made[0].path).exists()
    finally:
        await client.aclose()
