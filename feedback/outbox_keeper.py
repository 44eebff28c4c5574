"""The feedback outbox's keeper: confirms what ingestion has stored, sends again what it has not.

Ingestion marks each feedback event id it has handled (joined into a buffer, waiting for its
interaction, or dead-lettered) in a Redis sorted set, after its writes. The keeper looks the
outbox's pending ids up there every `every_s`: found ones are confirmed (dropped from the outbox);
ones still missing `resend_after_s` after they were last sent go to the broker again (a broker
that restarted empty, a lost partition). Ingestion is idempotent by event id, so a resend of an
event that was only slow costs a duplicate count, never a second record.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from clora.core.outbox import Outbox
from clora.feedback.webhook import FeedbackPublisher

log = logging.getLogger("clora.outbox")
CONFIRMED = Counter("clora_feedback_outbox_confirmed_total", "Feedback events confirmed stored by ingestion")
RESENT = Counter("clora_feedback_outbox_resent_total", "Feedback events sent to the broker again")
PENDING = Gauge("clora_feedback_outbox_pending", "Accepted feedback events not yet confirmed by ingestion")
CHUNK = 1000


class OutboxKeeper:
    def __init__(self, outbox: Outbox, publisher: FeedbackPublisher, redis: aioredis.Redis, handled_key: str,
                 every_s: float = 1.0, resend_after_s: float = 30.0):
        self.outbox, self.publisher, self.redis = outbox, publisher, redis
        self.handled_key, self.every_s, self.resend_after_s = handled_key, every_s, resend_after_s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the next tick tries again
                log.warning("outbox keeper: %s: %s", type(exc).__name__, exc)

    async def tick(self) -> tuple[int, int]:
        """(confirmed, resent) this round."""
        now = time.time()
        pending = self.outbox.unconfirmed(sent_before=float("inf"))
        PENDING.set(len(pending))
        if not pending:
            return 0, 0
        handled: set[str] = set()
        for start in range(0, len(pending), CHUNK):
            ids = [m.id for m in pending[start:start + CHUNK]]
            scores = await self.redis.zmscore(self.handled_key, ids)
            handled.update(i for i, score in zip(ids, scores) if score is not None)
        confirmed = await asyncio.to_thread(self.outbox.confirm, handled) if handled else 0
        CONFIRMED.inc(confirmed)
        stale = [m for m in self.outbox.unconfirmed(sent_before=now - self.resend_after_s) if m.id not in handled]
        if stale:
            log.warning("outbox: %d feedback events not stored by ingestion %.0f s after sending; sending again",
                        len(stale), self.resend_after_s)
            try:
                await asyncio.to_thread(self.publisher.send_and_wait, [(m.topic, m.key, m.value) for m in stale])
            except Exception:
                await self.publisher.reset()
                raise
            self.outbox.mark_sent([m.id for m in stale], time.time())
            RESENT.inc(len(stale))
        PENDING.set(len(self.outbox))
        return confirmed, len(stale)
