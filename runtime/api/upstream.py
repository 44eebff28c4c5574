"""The engine call shared by the chat endpoint and admin sampling: forward under a lease on the
version, reload an adapter the engine lost, and map the engine's errors to ours."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import orjson

from clora.core.http import APIError
from clora.runtime.adapters import AdapterVersion
from clora.runtime.engine_client import EngineClient, EngineResponse, EngineUnavailable
from clora.runtime.routing import Router

log = logging.getLogger("clora.gateway")


async def send_upstream(stack: AsyncExitStack, router: Router, client: EngineClient,
                        version: AdapterVersion | None, body: dict) -> EngineResponse:
    """Forward under a lease on the version; if the engine lost the adapter, reload once and retry."""
    for attempt in (1, 2):
        await stack.enter_async_context(router.lease(version))
        try:
            resp = await client.chat(body)
        except EngineUnavailable as exc:
            raise APIError(503, f"The engine is restarting; retry shortly ({exc}).", "engine_unavailable",
                           headers={"Retry-After": "5"}) from None
        stack.callback(resp.release)
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
    if status >= 500:
        return APIError(503, f"Engine error: {message}", "engine_error")
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
