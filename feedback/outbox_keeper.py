"""The feedback outbox's keeper: confirms what ingestion has stored, sends again what it has not.

Ingestion marks each feedback event id it has handled (joined into a buffer, waiting for its
interaction, or dead-lettered) in a Redis sorted set, after its writes: that set is where the
keeper (clora.core.outbox.OutboxKeeper) looks the outbox's pending ids up.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from clora.core.outbox import Outbox, OutboxMessage
from clora.core.outbox_keeper import OutboxKeeper
from clora.feedback.webhook import FeedbackPublisher


class FeedbackOutboxKeeper(OutboxKeeper):
    name = "feedback"

    def __init__(self, outbox: Outbox, publisher: FeedbackPublisher, redis: aioredis.Redis, handled_key: str,
                 every_s: float = 1.0, resend_after_s: float = 30.0):
        super().__init__(outbox, every_s, resend_after_s)
        self.publisher, self.redis, self.handled_key = publisher, redis, handled_key

    async def stored(self, ids: list[str]) -> set[str]:
        scores = await self.redis.zmscore(self.handled_key, ids)
        return {i for i, score in zip(ids, scores) if score is not None}

    async def resend(self, messages: list[OutboxMessage]) -> None:
        try:
            await asyncio.to_thread(self.publisher.send_and_wait, [(m.topic, m.key, m.value) for m in messages])
        except Exception:
            await self.publisher.reset()
            raise
