"""`POST /v1/feedback`: feedback events in, on disk (the outbox) and acknowledged by the broker
(acks=all) before 202.

Callers are customers (their own traces) or operators (traces of the customers in their scope).
Ownership is read off the signed trace id, so a trace of another customer answers 404 exactly
like one that was never issued. Events without an `event_id` get one; the response lists them, so
a client can retry a batch without double-applying it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from kafka.errors import KafkaError
from prometheus_client import Counter

from clora.core.customers import CustomerStore
from clora.core.http import APIError, JsonBody, bearer, unauthorized
from clora.core.outbox import Outbox, OutboxFull, OutboxMessage
from clora.core.traces import TraceSigner
from clora.wire.feedback import FeedbackBatch, FeedbackEvent, FeedbackMessage
from clora.wire.kafka import ensure_topics, reliable_producer

FEEDBACK = Counter("clora_feedback_events_total", "Feedback events by outcome", ["outcome"])


class FeedbackPublisher:
    """Writes feedback messages to the outbox (fsync'd), sends them and waits for the broker's
    acknowledgement (acks=all); a 202 needs both. The outbox keeps each message until ingestion
    has it in Redis (`OutboxKeeper`), so a broker that loses it (restarted empty) gets it again."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = 4, timeout_s: float = 10.0,
                 outbox: Outbox | None = None):
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.timeout_s = timeout_s
        self.outbox = outbox
        self._producer = None

    def send_and_wait(self, messages: list[tuple[str, str, str]]) -> None:
        """(topic, key, JSON value) each; raises unless the broker acknowledged every one."""
        if self._producer is None:
            ensure_topics(self.bootstrap, [self.topic], self.partitions)
            self._producer = reliable_producer(self.bootstrap, "clora-feedback")
        futures = [self._producer.send(topic, key=key.encode(), value=value.encode()) for topic, key, value in messages]
        self._producer.flush(timeout=self.timeout_s)
        for future in futures:
            future.get(timeout=0)  # raises if that message was not acknowledged

    async def reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(producer.close, 0)

    async def publish(self, messages: list[FeedbackMessage]) -> None:
        now = time.time()
        kept = [OutboxMessage(id=m.event.event_id, topic=self.topic, key=m.customer, value=m.model_dump_json(),
                              added_at=now) for m in messages]
        added: set[str] = set()
        if self.outbox is not None:
            try:
                added = await self.outbox.add(kept)
            except OutboxFull as exc:
                FEEDBACK.labels("outbox_full").inc(len(messages))
                raise APIError(503, f"Feedback cannot be accepted now ({exc}); retry later.", "ingestion_behind",
                               headers={"Retry-After": "30"}) from None
        try:
            await asyncio.to_thread(self.send_and_wait, [(k.topic, k.key, k.value) for k in kept])
        except (KafkaError, OSError) as exc:
            await self.reset()
            if added:  # answered 503: not accepted, so not kept (an id accepted before stays)
                await asyncio.to_thread(self.outbox.withdraw, added)
            raise APIError(503, f"Feedback could not be stored ({exc.__class__.__name__}); retry with the same "
                                "event_id values.", "broker_unavailable", headers={"Retry-After": "5"}) from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class RateLimiter:
    """Token bucket per caller: `rate` events/s sustained, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str, n: int) -> float:
        """0 if allowed, else seconds until it would be."""
        now = time.monotonic()
        tokens, last = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if n > tokens:
            self._buckets[caller] = (tokens, now)
            return (n - tokens) / self.rate
        self._buckets[caller] = (tokens - n, now)
        return 0.0


@dataclass
class WebhookLimits:
    max_body_bytes: int = 1 << 20
    events_per_s: float = 200.0
    burst: int = 2000


@dataclass
class Webhook:
    """The webhook's parts; one per app, on `app.state.feedback`."""

    customers: CustomerStore
    traces: TraceSigner
    publisher: FeedbackPublisher
    limits: WebhookLimits
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.limits.events_per_s, self.limits.burst)

    async def caller_scope(self, request: Request) -> tuple[str, list[str]]:
        """(who submits, the customers whose traces they may rate)."""
        key = bearer(request)
        customer = await self.customers.authenticate(key)
        if customer is not None:
            return "customer", [customer]
        operator = await self.customers.authenticate_operator(key)
        if operator is not None:
            return f"operator:{operator.name}", operator.customers
        raise unauthorized()


def webhook_of(request: Request) -> Webhook:
    return request.app.state.feedback


def _events(body: Any) -> list[FeedbackEvent]:
    """One event, or `{"events": [...]}`."""
    if isinstance(body, dict) and "events" in body:
        return FeedbackBatch.model_validate(body).events
    return [FeedbackEvent.model_validate(body)]


FEEDBACK_BODY = JsonBody(FeedbackEvent | FeedbackBatch, lambda request: webhook_of(request).limits.max_body_bytes,
                         name="FeedbackBody", validate=_events, what="feedback", code="invalid_feedback")
router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", status_code=202, openapi_extra=FEEDBACK_BODY.openapi)
async def submit_feedback(request: Request) -> JSONResponse:
    webhook = webhook_of(request)
    submitted_by, scope = await webhook.caller_scope(request)
    events: list[FeedbackEvent] = (await FEEDBACK_BODY(request)).value
    limits = webhook.limits
    wait = webhook.limiter.take(submitted_by if submitted_by != "customer" else scope[0], len(events))
    if wait:
        FEEDBACK.labels("rate_limited").inc(len(events))
        raise APIError(429, f"Feedback rate limit ({limits.events_per_s:g} events/s) exceeded.",
                       "rate_limited", headers={"Retry-After": str(max(1, round(wait)))})
    received = time.time()
    messages = []
    for event in events:
        owner = next((c for c in scope if webhook.traces.issued_to(event.trace_id, c)), None)
        if owner is None:
            FEEDBACK.labels("unknown_trace").inc()
            raise APIError(404, f"Trace `{event.trace_id}` does not exist.", "trace_not_found", "trace_id")
        event = event if event.event_id else event.model_copy(update={"event_id": uuid.uuid4().hex})
        messages.append(FeedbackMessage(event=event, customer=owner, submitted_by=submitted_by,
                                        received_at=received))
    await webhook.publisher.publish(messages)
    FEEDBACK.labels("accepted").inc(len(messages))
    return JSONResponse({"accepted": len(messages), "event_ids": [m.event.event_id for m in messages]},
                        status_code=202)


def mount_feedback(app: FastAPI, customers: CustomerStore, traces: TraceSigner, publisher: FeedbackPublisher,
                   limits: WebhookLimits) -> None:
    """Serve `POST /v1/feedback` from `app` (the gateway's, in `clora serve`)."""
    app.state.feedback = Webhook(customers, traces, publisher, limits)
    app.include_router(router)
