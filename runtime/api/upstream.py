"""The engine call shared by the chat endpoint and admin sampling: forward under a lease on the
version, reload an adapter the engine lost, bound the wait, and map the engine's errors to ours."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import orjson

from clora.core.http import APIError
from clora.runtime.adapters import AdapterVersion
from clora.runtime.engine import AdapterRejected, Engine, EngineResponse, EngineUnavailable
from clora.runtime.routing import Router

log = logging.getLogger("clora.gateway")


async def send_upstream(stack: AsyncExitStack, router: Router, engine: Engine,
                        version: AdapterVersion | None, body: dict, timeout_s: float | None = None) -> EngineResponse:
    """Forward under a lease on the version; if the engine lost the adapter, reload once and retry.
    The engine must start its answer within `timeout_s` (a whole answer: all of it; a stream: its
    status, which vLLM sends at once), or the request is aborted there and answered 504."""
    for attempt in (1, 2):
        try:
            await stack.enter_async_context(router.lease(version))
        except AdapterRejected as exc:  # e.g. its files are gone: the version exists but cannot be served
            log.error("engine refused adapter %s at request time: %s", version.name if version else None, exc)
            raise APIError(503, f"Model `{version.name if version else None}` cannot be loaded now; the operator "
                                "has been told.", "adapter_unavailable") from None
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: no task of its own per request
                resp = await engine.chat(body)
        except EngineUnavailable as exc:
            raise APIError(503, f"The engine is restarting; retry shortly ({exc}).", "engine_unavailable",
                           headers={"Retry-After": "5"}) from None
        except TimeoutError:
            raise APIError(504, f"The engine did not answer within {timeout_s:g} s; the request was aborted.",
                           "upstream_timeout") from None
        stack.push_async_callback(resp.aclose)
        if resp.status == 200:
            return resp
        text = await resp.text()
        if resp.status == 404 and version is not None and attempt == 1:
            log.warning("engine lost adapter %s; reloading", version.name)
            router.forget(version.name)
            continue
        raise upstream_error(resp.status, text)
    raise AssertionError("unreachable")


def upstream_error(status: int, text: str) -> APIError:
    try:
        message = orjson.loads(text)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = text[:500] or "engine error"
    if status >= 500:  # the engine failing (dying, restarting: seen in the soak) is transient to the caller
        return APIError(503, f"Engine error: {message}", "engine_error", headers={"Retry-After": "5"})
    return APIError(status, message, "invalid_request")


async def sse_data(resp: EngineResponse) -> AsyncIterator[bytes]:
    """The `data:` payloads of an SSE stream."""
    buffer = b""
    async for block in resp.iter_any():
        buffer += block
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r")
