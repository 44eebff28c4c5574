"""The engine call (`runtime/api/upstream.py`) against a fake engine behind the `Engine` protocol:
what the gateway answers for each way the engine can fail, and the one reload of an adapter the
engine lost. Logic only: no vLLM, broker or Redis (the registry's client is never connected)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from clora.core.http import APIError
from clora.runtime.adapters import AdapterRegistry
from clora.runtime.api.upstream import send_upstream
from clora.runtime.routing import Router
from clora.wire.admin import AdapterVersion
from tests.fakes import FakeEngine, error_answer


def parts(tmp_path: Path) -> tuple[FakeEngine, Router, AdapterVersion]:
    engine = FakeEngine()
    router = Router(AdapterRegistry(aioredis.Redis(), tmp_path / "adapters"), engine)
    version = AdapterVersion(name="acme.v1", customer="acme", version=1, path=str(tmp_path), created_at=0.0)
    return engine, router, version


async def ask(router: Router, engine: FakeEngine, version: AdapterVersion | None, timeout_s: float | None = None):
    async with AsyncExitStack() as stack:
        body = {"model": version.name if version else engine.base, "messages": [{"role": "user", "content": "hi"}]}
        resp = await send_upstream(stack, router, engine, version, body, timeout_s)
        return await resp.json()


def failure(router: Router, engine: FakeEngine, version: AdapterVersion | None, timeout_s: float | None = None):
    with pytest.raises(APIError) as caught:
        asyncio.run(ask(router, engine, version, timeout_s))
    return caught.value


def test_a_version_is_loaded_on_first_use_and_reloaded_once_after_the_engine_lost_it(tmp_path):
    engine, router, version = parts(tmp_path)
    router.routes["acme"] = version  # served to its customer: kept loaded between requests

    async def scenario():
        first = await ask(router, engine, version)
        engine.loaded.clear()  # the engine restarted without the router knowing
        second = await ask(router, engine, version)
        return first, second

    first, second = asyncio.run(scenario())
    assert first["model"] == second["model"] == "acme.v1"
    assert engine.count("load", "acme.v1") == 2  # once on first use, once after the 404
    assert engine.count("chat") == 3  # the answer, the 404, the retry
    assert router.requests_in_flight() == 0


def test_a_version_lost_again_right_after_its_reload_is_an_error_not_a_loop(tmp_path):
    engine, router, version = parts(tmp_path)
    engine.queued = [error_answer(404, "The model `acme.v1` does not exist.")] * 2
    error = failure(router, engine, version)
    assert (error.status, error.code) == (404, "invalid_request") and "does not exist" in error.message
    assert engine.count("chat") == 2


def test_an_engine_restarting_is_a_503_the_client_retries(tmp_path):
    engine, router, _ = parts(tmp_path)
    engine.ready = False
    error = failure(router, engine, None)
    assert (error.status, error.code, error.headers) == (503, "engine_unavailable", {"Retry-After": "5"})


def test_an_engine_failing_a_request_is_a_503_with_retry_after_and_its_message(tmp_path):
    engine, router, _ = parts(tmp_path)
    engine.queued = [error_answer(500, "EngineCore died")]
    error = failure(router, engine, None)
    assert (error.status, error.code, error.headers) == (503, "engine_error", {"Retry-After": "5"})
    assert "EngineCore died" in error.message


def test_a_request_the_engine_rejects_keeps_its_status_and_the_engines_message(tmp_path):
    engine, router, _ = parts(tmp_path)
    engine.queued = [error_answer(400, "max_tokens is too large")]
    error = failure(router, engine, None)
    assert (error.status, error.code, error.message) == (400, "invalid_request", "max_tokens is too large")


def test_an_engine_slower_than_the_timeout_is_a_504_and_the_lease_is_released(tmp_path):
    engine, router, version = parts(tmp_path)
    engine.delay_s = 1.0
    error = failure(router, engine, version, timeout_s=0.05)
    assert (error.status, error.code) == (504, "upstream_timeout")
    assert router.requests_in_flight() == 0


def test_a_version_the_engine_refuses_to_load_is_a_503_and_nothing_is_asked(tmp_path):
    engine, router, version = parts(tmp_path)
    engine.refuse = {"acme.v1"}
    error = failure(router, engine, version)
    assert (error.status, error.code) == (503, "adapter_unavailable") and "acme.v1" in error.message
    assert engine.count("chat") == 0 and router.requests_in_flight() == 0
