"""The OpenAI-compatible gateway: auth, routing to the customer's adapter, capture of every answer.

Per request: authenticate the key -> validate the body -> resolve `model` to an adapter version
the caller owns -> forward to vLLM asking for token ids and logprobs -> give the client what it
asked for -> hand the full interaction to capture (never waiting on Kafka).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask

from clora.core.customers import CustomerStore
from clora.core.http import APIError, bearer, install_error_handlers, model_not_found, read_body, unauthorized
from clora.core.traces import TraceSigner
from clora.runtime.adapters import AdapterVersion
from clora.runtime.capture import Capture
from clora.runtime.engine import AdapterRejected, EngineClient, EngineResponse, EngineUnavailable
from clora.runtime.protocol import NON_SAMPLING, ChatRequest
from clora.runtime.responses import ClientWants, StreamAccumulator, for_client
from clora.runtime.routing import ModelNotFound, Router
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord, captured_choices

log = logging.getLogger("clora.gateway")
TRACE_HEADER = "X-Clora-Trace-Id"

REQUESTS = Counter("clora_requests_total", "Chat requests by status", ["status", "stream"])
LATENCY = Histogram("clora_request_seconds", "Chat request latency through the gateway", ["stream"],
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))


class Engine(Protocol):
    client: EngineClient

    def is_ready(self) -> bool: ...


@dataclass
class GatewayConfig:
    base_model: str
    served_base_name: str = "base"
    max_request_bytes: int = 1 << 20
    admin_key: str | None = None


class PublishBody(BaseModel):
    path: str
    origin: str = Field(default="manual", max_length=200, description="Who made it (the trainer names its checkpoint).")
    switch: bool = Field(default=True, description="Serve it now; false = a candidate for the promotion gate.")


class RouteBody(BaseModel):
    adapter: str


class PinBody(BaseModel):
    pin: list[str] = Field(default_factory=list, description="Versions kept through pruning from now on.")
    unpin: list[str] = Field(default_factory=list, description="Versions pruning may delete again.")


def _parse_chat(raw: bytes) -> tuple[ChatRequest, dict[str, Any]]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:  # also raised for invalid UTF-8
        raise APIError(400, "Request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object.", "invalid_request")
    try:
        return ChatRequest.model_validate(body), body
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"Invalid request: {param}: {first['msg']}", "invalid_request", param) from None


def _upstream_error(resp_status: int, text: str) -> APIError:
    try:
        message = orjson.loads(text)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = text[:500] or "engine error"
    if resp_status >= 500:
        return APIError(503, f"Engine error: {message}", "engine_error")
    return APIError(resp_status, message, "invalid_request")


def create_app(config: GatewayConfig, customers: CustomerStore, router: Router, engine: Engine,
               capture: Capture | None, traces: TraceSigner) -> FastAPI:
    app = FastAPI(title="clora gateway", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    async def authenticate(request: Request) -> str:
        customer = await customers.authenticate(bearer(request))
        if customer is None:
            raise unauthorized()
        return customer

    def require_admin(request: Request) -> None:
        if not config.admin_key or bearer(request) != config.admin_key:
            raise unauthorized()

    def require_engine() -> None:
        if not engine.is_ready():
            raise APIError(503, "The engine is restarting; retry shortly.", "engine_unavailable",
                           headers={"Retry-After": "5"})

    # -- inference ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            return await chat(request)
        except APIError as exc:
            REQUESTS.labels(str(exc.status), "unknown").inc()
            raise

    async def chat(request: Request) -> Response:
        arrived = time.time()
        customer = await authenticate(request)
        chat, body = _parse_chat(await read_body(request, config.max_request_bytes))
        try:
            version = await router.resolve(customer, chat.model)
        except ModelNotFound:
            raise model_not_found(chat.model) from None
        require_engine()

        trace_id = traces.new(customer)
        wants = ClientWants(logprobs=bool(chat.logprobs), token_ids=bool(chat.return_token_ids))
        shown_model = version.name if version else chat.model
        upstream = dict(body, model=version.name if version else config.served_base_name,
                        return_token_ids=True, logprobs=True)
        # Only the sampled tokens' logprobs, unless the client asked for alternatives too.
        upstream["top_logprobs"] = chat.top_logprobs if chat.logprobs and chat.top_logprobs else 0

        def record(prompt_ids: list[int], choices: list[CapturedChoice]) -> None:
            if capture is None:
                return
            capture.submit(InteractionRecord(
                trace_id=trace_id, customer=customer, adapter=version.name if version else None,
                adapter_version=version.version if version else None, base_model=config.base_model,
                request=CapturedRequest(messages=body["messages"], tools=chat.tools, tool_choice=chat.tool_choice,
                                        sampling={k: v for k, v in body.items() if k not in NON_SAMPLING}),
                prompt_token_ids=prompt_ids, choices=choices, stream=chat.stream,
                latency_ms=(time.time() - arrived) * 1000, created_at=arrived,
            ))

        stack = AsyncExitStack()
        try:
            resp = await _send_upstream(stack, router, engine.client, version, upstream)
        except BaseException:
            await stack.aclose()
            raise
        if not chat.stream:
            try:
                payload = orjson.loads(await resp.read())
            finally:
                await stack.aclose()

            async def record_answer() -> None:  # once the response is on the wire (async: no thread hop)
                record(payload.get("prompt_token_ids") or [], captured_choices(payload))

            REQUESTS.labels("200", "false").inc()
            LATENCY.labels("false").observe(time.time() - arrived)
            return Response(orjson.dumps(for_client(payload, trace_id, shown_model, wants)),
                            media_type="application/json", headers={TRACE_HEADER: trace_id},
                            background=BackgroundTask(record_answer))

        async def relay():
            acc, recorded = StreamAccumulator(), False
            try:
                async for data in _sse_data(resp):
                    if data == b"[DONE]":
                        # Captured before the client sees the end: a client that hangs up right
                        # after [DONE] cancels this generator at its next await.
                        if acc.complete():
                            record(acc.prompt_token_ids, acc.choices())
                            recorded = True
                        yield b"data: [DONE]\n\n"
                        continue
                    chunk = orjson.loads(data)
                    acc.add(chunk)
                    yield b"data: " + orjson.dumps(for_client(chunk, trace_id, shown_model, wants)) + b"\n\n"
            finally:
                await stack.aclose()
                LATENCY.labels("true").observe(time.time() - arrived)
            if not recorded and acc.complete():  # an engine that ended the stream without [DONE]
                record(acc.prompt_token_ids, acc.choices())

        REQUESTS.labels("200", "true").inc()
        return StreamingResponse(relay(), media_type="text/event-stream", headers={TRACE_HEADER: trace_id})

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        customer = await authenticate(request)
        current = router.routes.get(customer)
        owned = await router.registry.versions(customer)
        created = int(current.created_at) if current else 0
        data = [{"id": "default", "object": "model", "created": created, "owned_by": customer,
                 "current": current.name if current else None}]
        data += [{"id": v.name, "object": "model", "created": int(v.created_at), "owned_by": customer}
                 for v in owned]
        return {"object": "list", "data": data}

    # -- operations -----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ready = engine.is_ready()
        body = {"status": "ok" if ready else "degraded", "engine": ready,
                "capture_connected": capture.connected() if capture else None}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- admin: adapter versions (the trainer and the CLI publish through here) ------------------
    async def known_customer(name: str) -> str:
        if not await customers.exists(name):
            raise APIError(404, f"Customer `{name}` does not exist.", "customer_not_found")
        return name

    @app.post("/admin/customers/{customer}/adapters")
    async def publish_adapter(customer: str, body: PublishBody, request: Request) -> dict:
        require_admin(request)
        await known_customer(customer)
        require_engine()
        started = time.perf_counter()
        try:
            version = await router.publish(customer, Path(body.path), body.origin, switch=body.switch)
        except AdapterRejected as exc:
            raise APIError(422, str(exc), "adapter_rejected") from None
        return {**version.model_dump(), "swap_ms": (time.perf_counter() - started) * 1000}

    @app.post("/admin/customers/{customer}/sample")
    @app.post("/admin/customers/{customer}/v1/chat/completions")  # the same, for the openai SDK (evals)
    async def sample(customer: str, request: Request) -> JSONResponse:
        """For the trainer and evals: completions under one of the customer's adapters (`default` =
        its current one; the base model by its served name) with token ids and sampled-token
        logprobs; not captured, but leased like any request, so a swap meanwhile cannot unload the
        version being sampled."""
        require_admin(request)
        await known_customer(customer)
        chat, body = _parse_chat(await read_body(request, config.max_request_bytes))
        if chat.stream:
            raise APIError(400, "Sampling does not stream.", "invalid_request", "stream")
        try:  # the base model by name too: evals compare against it
            version = None if chat.model == config.served_base_name else await router.resolve(customer, chat.model)
        except ModelNotFound:
            raise model_not_found(chat.model) from None
        require_engine()
        upstream = dict(body, model=version.name if version else config.served_base_name,
                        return_token_ids=True, logprobs=True, top_logprobs=0)
        async with AsyncExitStack() as stack:
            resp = await _send_upstream(stack, router, engine.client, version, upstream)
            payload = orjson.loads(await resp.read())
        return JSONResponse({**payload, "adapter": version.name if version else None})

    @app.put("/admin/customers/{customer}/route")
    async def set_route(customer: str, body: RouteBody, request: Request) -> dict:
        require_admin(request)
        await known_customer(customer)
        require_engine()
        version = await router.registry.get(body.adapter)
        if version is None or version.customer != customer:
            raise model_not_found(body.adapter)
        await router.switch(version)
        return version.model_dump()

    @app.delete("/admin/customers/{customer}/route")
    async def clear_route(customer: str, request: Request) -> dict:
        require_admin(request)
        await known_customer(customer)
        await router.serve_base(customer)
        return {"customer": customer, "current": None}

    @app.put("/admin/customers/{customer}/pins")
    async def set_pins(customer: str, body: PinBody, request: Request) -> dict:
        """Keep versions through pruning whatever their age (the promotion gate pins rollback targets)."""
        require_admin(request)
        await known_customer(customer)
        for name in body.pin:
            version = await router.registry.get(name)
            if version is None or version.customer != customer:
                raise model_not_found(name)
        await router.registry.pin(customer, body.unpin, keep=False)
        await router.registry.pin(customer, body.pin)
        return {"customer": customer, "pinned": await router.registry.pinned(customer)}

    @app.get("/admin/load")
    async def load(request: Request) -> dict:
        """How busy serving is: the trainer yields the machine when this is high."""
        require_admin(request)
        return {"requests_in_flight": router.requests_in_flight(), "engine_ready": engine.is_ready()}

    @app.get("/admin/customers/{customer}/adapters")
    async def customer_adapters(customer: str, request: Request) -> dict:
        require_admin(request)
        await known_customer(customer)
        current = router.routes.get(customer)
        versions = await router.registry.versions(customer)
        return {"customer": customer, "current": current.name if current else None,
                "versions": [v.model_dump() for v in versions]}

    return app


async def _send_upstream(stack: AsyncExitStack, router: Router, client: EngineClient,
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
        raise _upstream_error(resp.status, text)
    raise AssertionError("unreachable")


async def _sse_data(resp: EngineResponse) -> AsyncIterator[bytes]:
    """The `data:` payloads of an SSE stream."""
    buffer = b""
    async for block in resp.iter_any():
        buffer += block
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r")
