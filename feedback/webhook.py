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
from kafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import Counter

from clora.core.customers import CustomerStore
from clora.core.http import APIError, JsonBody, bearer, unauthorized
from clora.core.outbox import Outbox, OutboxFull, OutboxMessage
from clora.core.traces import TraceSigner
from clora.wire.feedback import FeedbackBatch, FeedbackEvent, FeedbackPost
from clora.wire.kafka import discard_producer, ensure_topics, reliable_producer

FEEDBACK = Counter("clora_feedback_events_total", "Feedback events by outcome", ["outcome"])
# A request's events for one customer go out as one message, split past this size: well under
# the producer's and the broker's 1 MiB message limit.
MAX_POST_BYTES = 256 << 10


def posts_of(owned: list[tuple[str, FeedbackEvent]], submitted_by: str, received_at: float
             ) -> list[tuple[FeedbackPost, str]]:
    """The topic messages for one request's events (each with its owner): one post per customer,
    halved until each fits MAX_POST_BYTES; each with its JSON."""
    by_owner: dict[str, list[FeedbackEvent]] = {}
    for owner, event in owned:
        by_owner.setdefault(owner, []).append(event)
    posts: list[tuple[FeedbackPost, str]] = []

    def add(customer: str, events: list[FeedbackEvent]) -> None:
        post = FeedbackPost(id=uuid.uuid4().hex, customer=customer, submitted_by=submitted_by,
                            received_at=received_at, events=events)
        value = post.model_dump_json()
        if len(value) > MAX_POST_BYTES and len(events) > 1:
            add(customer, events[:len(events) // 2])
            add(customer, events[len(events) // 2:])
        else:
            posts.append((post, value))

    for customer, events in by_owner.items():
        add(customer, events)
    return posts


class FeedbackPublisher:
    """Writes feedback posts to the outbox (fsync'd), sends them and waits for the broker's
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
        futures = self._send(messages)
        self._producer.flush(timeout=self.timeout_s)
        for future in futures:
            future.get(timeout=0)  # raises if that message was not acknowledged

    def _send(self, messages: list[tuple[str, str, str]]) -> list:
        """Hand the messages to the producer (may block: first metadata, a full buffer)."""
        if self._producer is None:
            ensure_topics(self.bootstrap, [self.topic], self.partitions)
            self._producer = reliable_producer(self.bootstrap, "clora-feedback")
        return [self._producer.send(topic, key=key.encode(), value=value.encode()) for topic, key, value in messages]

    async def send(self, messages: list[tuple[str, str, str]]) -> None:
        """`send_and_wait` for the event loop: no thread waits for the acknowledgement (a pool
        of a few threads each blocked in a flush capped how many requests could be in flight),
        and without a flush per request the producer batches concurrent requests' messages
        (linger) into one produce request."""
        loop = asyncio.get_running_loop()
        acks = [_acknowledged(loop, future) for future in await asyncio.to_thread(self._send, messages)]
        try:
            await asyncio.wait_for(asyncio.gather(*acks), self.timeout_s)
        except asyncio.TimeoutError:
            raise KafkaTimeoutError(f"no acknowledgement within {self.timeout_s:g} s") from None

    async def reset(self) -> None:
        """Drop the producer after a failure (the next send connects anew); never raises: the
        caller is answering 503 and must not become a 500."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(discard_producer, producer)

    async def publish(self, posts: list[tuple[FeedbackPost, str]]) -> None:
        """Each (post, its JSON) kept and acknowledged, or APIError 503 (nothing kept)."""
        now = time.time()
        kept = [OutboxMessage(id=post.id, topic=self.topic, key=post.customer, value=value, added_at=now)
                for post, value in posts]
        added: set[str] = set()
        if self.outbox is not None:
            try:
                added = await self.outbox.add(kept)
            except OutboxFull as exc:
                FEEDBACK.labels("outbox_full").inc(sum(len(post.events) for post, _ in posts))
                raise APIError(503, f"Feedback cannot be accepted now ({exc}); retry later.", "ingestion_behind",
                               headers={"Retry-After": "30"}) from None
        try:
            await self.send([(k.topic, k.key, k.value) for k in kept])
        except (KafkaError, OSError) as exc:
            await self.reset()
            if added:  # answered 503: not accepted, so not kept (an id accepted before stays)
                await asyncio.to_thread(self.outbox.withdraw, added)
            raise APIError(503, f"Feedback could not be stored ({exc.__class__.__name__}); retry with the same "
                                "event_id values.", "broker_unavailable", headers={"Retry-After": "5"}) from None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


def _acknowledged(loop: asyncio.AbstractEventLoop, future) -> asyncio.Future:
    """An asyncio future settled when the producer's future is (from its sender thread)."""
    done = loop.create_future()

    def settle(result: object) -> None:
        if not done.done():
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(None)

    future.add_callback(lambda metadata: loop.call_soon_threadsafe(settle, metadata))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc))
    return done


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
    owned: list[tuple[str, FeedbackEvent]] = []
    for event in events:
        owner = next((c for c in scope if webhook.traces.issued_to(event.trace_id, c)), None)
        if owner is None:
            FEEDBACK.labels("unknown_trace").inc()
            raise APIError(404, f"Trace `{event.trace_id}` does not exist.", "trace_not_found", "trace_id")
        owned.append((owner, event if event.event_id else event.model_copy(update={"event_id": uuid.uuid4().hex})))
    await webhook.publisher.publish(posts_of(owned, submitted_by, time.time()))
    FEEDBACK.labels("accepted").inc(len(owned))
    return JSONResponse({"accepted": len(owned), "event_ids": [event.event_id for _, event in owned]},
                        status_code=202)


def mount_feedback(app: FastAPI, customers: CustomerStore, traces: TraceSigner, publisher: FeedbackPublisher,
                   limits: WebhookLimits) -> None:
    """Serve `POST /v1/feedback` from `app` (the gateway's, in `clora serve`)."""
    app.state.feedback = Webhook(customers, traces, publisher, limits)
    app.include_router(router)
