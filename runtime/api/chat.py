"""`POST /v1/chat/completions`: the customer's request, answered under its adapter and captured.

Per request: authenticate the key -> validate the body -> resolve `model` to an adapter version
the caller owns -> forward to vLLM asking for token ids and logprobs -> give the client what it
asked for -> hand the full interaction to capture before the answer's last byte (journaled, so a
crash right after the answer cannot lose it; never waiting on Kafka).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Counter, Histogram

from clora.core.http import APIError, model_not_found
from clora.runtime.adapters import AdapterVersion
from clora.runtime.api.deps import CHAT_BODY, Gateway, gateway_of
from clora.runtime.api.upstream import send_upstream, sse_data
from clora.runtime.engine import EngineResponse
from clora.runtime.limits import Slot
from clora.runtime.protocol import NON_SAMPLING, ChatRequest, sampler_of
from clora.runtime.responses import ClientWants, StreamAccumulator, for_client
from clora.runtime.routing import ModelNotFound
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord, captured_choices

router = APIRouter(tags=["chat"])
TRACE_HEADER = "X-Clora-Trace-Id"
REQUESTS = Counter("clora_requests_total", "Chat requests by status", ["status", "stream"])
LATENCY = Histogram("clora_request_seconds", "Chat request latency through the gateway", ["stream"],
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
Record = Callable[[list[int], list[CapturedChoice]], Awaitable[None]]


@router.post("/v1/chat/completions", openapi_extra=CHAT_BODY.openapi, response_model=None)
async def chat_completions(request: Request) -> Response:
    try:
        return await answer(gateway_of(request), request)
    except APIError as exc:
        REQUESTS.labels(str(exc.status), "unknown").inc()
        raise


async def answer(gateway: Gateway, request: Request) -> Response:
    """Authenticate, admit under the customer's limits, parse (in that order: a stranger learns
    nothing of the body rules), resolve the model, forward, and answer whole or as a stream."""
    arrived = time.time()
    customer = await gateway.authenticate(request)
    slot = gateway.limits.admit(customer)
    try:
        return await respond(gateway, request, customer, slot, arrived)
    except BaseException:
        slot.done()
        raise


async def respond(gateway: Gateway, request: Request, customer: str, slot: Slot, arrived: float) -> Response:
    body = await CHAT_BODY(request)
    chat, raw = body.value, body.raw
    gateway.refuse_unsupported(chat)
    try:
        version = await gateway.router.resolve(customer, chat.model)
    except ModelNotFound:
        raise model_not_found(chat.model) from None
    gateway.require_engine()
    gateway.refuse_unsafe_seed(chat.seed)

    trace_id = gateway.traces.new(customer)
    wants = ClientWants(logprobs=bool(chat.logprobs), token_ids=bool(chat.return_token_ids))
    shown_model = version.name if version else chat.model
    upstream = dict(raw, model=version.name if version else gateway.config.served_base_name,
                    return_token_ids=True, logprobs=True)
    # Only the sampled tokens' logprobs, unless the client asked for alternatives too.
    upstream["top_logprobs"] = chat.top_logprobs if chat.logprobs and chat.top_logprobs else 0
    record = recorder(gateway, customer, version, chat, raw, trace_id, arrived)

    await slot.wait_turn()  # the customer's share of the engine, when others compete for it
    stack = AsyncExitStack()
    try:
        resp = await send_upstream(stack, gateway.router, gateway.engine, version, upstream,
                                   gateway.config.upstream_timeout_s)
    except BaseException:
        await stack.aclose()
        raise
    headers = {TRACE_HEADER: trace_id}
    if not chat.stream:
        try:
            payload = await resp.json()
        finally:
            await stack.aclose()

        slot.done((payload.get("usage") or {}).get("total_tokens") or 0)
        await record(payload.get("prompt_token_ids") or [], captured_choices(payload))  # before any byte of it

        REQUESTS.labels("200", "false").inc()
        LATENCY.labels("false").observe(time.time() - arrived)
        return Response(orjson.dumps(for_client(payload, trace_id, shown_model, wants)),
                        media_type="application/json", headers=headers)
    REQUESTS.labels("200", "true").inc()
    return StreamingResponse(relay(resp, stack, record, trace_id, shown_model, wants, arrived, slot),
                             media_type="text/event-stream", headers=headers)


def recorder(gateway: Gateway, customer: str, version: AdapterVersion | None, chat: ChatRequest,
             raw: dict[str, Any], trace_id: str, arrived: float) -> Record:
    """How this request's interaction goes to capture once its answer is complete."""
    async def record(prompt_ids: list[int], choices: list[CapturedChoice]) -> None:
        if gateway.capture is None:
            return
        await gateway.capture.capture(InteractionRecord(
            trace_id=trace_id, customer=customer, adapter=version.name if version else None,
            adapter_version=version.version if version else None, base_model=gateway.config.base_model,
            request=CapturedRequest(messages=raw["messages"], tools=chat.tools, tool_choice=chat.tool_choice,
                                    sampling={k: v for k, v in raw.items() if k not in NON_SAMPLING}),
            sampler=sampler_of(chat, raw),
            prompt_token_ids=prompt_ids, choices=choices, stream=chat.stream,
            latency_ms=(time.time() - arrived) * 1000, created_at=arrived,
        ))
    return record


async def relay(resp: EngineResponse, stack: AsyncExitStack, record: Record, trace_id: str, shown_model: str,
                wants: ClientWants, arrived: float, slot: Slot) -> AsyncIterator[bytes]:
    """The engine's stream as the client's, accumulated for capture; the customer's slot held
    until it ends."""
    acc, recorded = StreamAccumulator(), False
    try:
        async for data in sse_data(resp):
            if data == b"[DONE]":
                # Captured before the client sees the end: a client that hangs up right
                # after [DONE] cancels this generator at its next await.
                if acc.complete():
                    await record(acc.prompt_token_ids, acc.choices())
                    recorded = True
                yield b"data: [DONE]\n\n"
                continue
            chunk = orjson.loads(data)
            acc.add(chunk)
            yield b"data: " + orjson.dumps(for_client(chunk, trace_id, shown_model, wants)) + b"\n\n"
    finally:
        await stack.aclose()
        LATENCY.labels("true").observe(time.time() - arrived)
        slot.done(acc.tokens())
    if not recorded and acc.complete():  # an engine that ended the stream without [DONE]
        await record(acc.prompt_token_ids, acc.choices())
