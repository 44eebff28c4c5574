"""Gateways on one Redis agree on routes: a switch, a rollback to the base model and a customer's
deletion through gateway A are served by gateway B without a restart, and B, started after a switch,
serves it from the start. Two routers (each a gateway's) with fake engines, on a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from clora.runtime.adapters import AdapterRegistry
from clora.runtime.routing import Router
from tests.fakes import FakeEngine


async def until(predicate, timeout_s: float = 3.0) -> float:
    """Seconds until `predicate()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "not propagated in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    return source


async def test_a_route_set_through_one_gateway_is_served_by_another(redis_url, tmp_path, adapter):
    redis_a, redis_b = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    a = Router(AdapterRegistry(redis_a, tmp_path / "adapters"), FakeEngine())
    b_engine = FakeEngine()
    b = Router(AdapterRegistry(redis_b, tmp_path / "adapters"), b_engine)
    customer, stop = f"shared-{uuid.uuid4().hex[:6]}", asyncio.Event()
    follower = asyncio.create_task(b.follow(stop, resync_s=60))  # announcements alone, not the resync
    try:
        await asyncio.sleep(0.3)  # subscribed
        first = await a.publish(customer, adapter)
        seconds = await until(lambda: b.routes.get(customer) == first)
        assert await b.resolve(customer, "default") == first and seconds < 1.0
        assert await b.resolve(customer, first.name) == first  # promoted: callable by name there too
        async with b.lease(first):  # B loads it into its own engine on first use
            assert b_engine.count("load", first.name) == 1

        second = await a.publish(customer, adapter)
        await until(lambda: b.routes.get(customer) == second)
        await a.switch(first)  # a rollback
        await until(lambda: b.routes.get(customer) == first)
        await a.serve_base(customer)
        await until(lambda: customer not in b.routes)
        assert await b.resolve(customer, "default") is None

        # A gateway started later (or whose subscription missed it) serves what Redis says.
        await a.switch(second)
        late = Router(AdapterRegistry(aioredis.Redis.from_url(redis_url), tmp_path / "adapters"), FakeEngine())
        late_follower = asyncio.create_task(late.follow(stop, resync_s=60))
        await until(lambda: late.routes.get(customer) == second)
        await until(lambda: b.routes.get(customer) == second)

        await a.delete_customer(customer)
        await until(lambda: customer not in b.routes and customer not in late.routes)
    finally:
        stop.set()
        await asyncio.gather(follower, *([late_follower] if "late_follower" in locals() else []))
        for client in (redis_a, redis_b):
            await client.aclose()


async def test_the_resync_catches_a_route_set_without_an_announcement(redis_url, tmp_path, adapter):
    """An announcement lost (B's subscription down at that moment) is caught by the periodic resync."""
    redis_a, redis_b = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    registry = AdapterRegistry(redis_a, tmp_path / "adapters")
    b = Router(AdapterRegistry(redis_b, tmp_path / "adapters"), FakeEngine())
    customer, stop = f"quiet-{uuid.uuid4().hex[:6]}", asyncio.Event()
    follower = asyncio.create_task(b.follow(stop, resync_s=0.5))
    try:
        await asyncio.sleep(0.3)
        version = await registry.register(customer, adapter)
        await redis_a.hset("clora:routes", customer, version.name)  # routed, never announced
        await until(lambda: b.routes.get(customer) == version)
    finally:
        stop.set()
        await follower
        for client in (redis_a, redis_b):
            await client.aclose()
