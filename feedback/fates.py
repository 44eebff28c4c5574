"""What became of one feedback event: the question a user asks first.

Ingestion keeps two small indexes per customer beside the replay buffer: events waiting for their
interaction (event id -> trace id, until they join or are dead-lettered) and events it
dead-lettered (event id -> reason, kept `DEAD_TTL_S` after the last one). `EventFates.lookup`
answers from those, the replay buffer (in it, trained by which versions, quarantined, applied then
evicted) and the webhook's outbox (accepted, not yet handled by ingestion).
"""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from clora.core.outbox import Outbox
from clora.feedback.replay import ReplayBuffer
from clora.wire.admin import EventFate

DEAD_TTL_S = 7 * 24 * 3600


def waiting_key(group_id: str, customer: str) -> str:
    return f"clora:ingest:{{{group_id}}}:waiting-events:{customer}"


def dead_key(group_id: str, customer: str) -> str:
    return f"clora:ingest:{{{group_id}}}:dead-events:{customer}"


def dead_entry(reason: str) -> bytes:
    return orjson.dumps({"reason": reason, "at": time.time()})


class EventFates:
    def __init__(self, redis: aioredis.Redis, group_id: str, replay: ReplayBuffer, outbox: Outbox | None = None):
        self.redis, self.group_id, self.replay, self.outbox = redis, group_id, replay, outbox

    async def counts(self, customer: str) -> tuple[int, int]:
        """(waiting for their interaction, dead-lettered) events of the customer."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(waiting_key(self.group_id, customer))
            pipe.hlen(dead_key(self.group_id, customer))
            waiting, dead = await pipe.execute()
        return int(waiting), int(dead)

    async def lookup(self, customer: str, event_id: str) -> EventFate | None:
        """Where the event is now; None when nothing here knows it."""
        fate = EventFate(customer=customer, event_id=event_id, state="in_buffer")
        record = await self.replay.record(customer, event_id)
        if record is not None:
            trained = await self.replay.consumed_by(customer, event_id)
            return fate.model_copy(update={"state": "trained" if trained else "in_buffer",
                                           "trace_id": record.trace_id, "trained_by": trained})
        held = await self.replay.quarantined_one(customer, event_id)
        if held is not None:
            return fate.model_copy(update={"state": "quarantined", "trace_id": held.record.trace_id,
                                           "reason": held.reason, "at": held.at})
        dead = await self.redis.hget(dead_key(self.group_id, customer), event_id)
        if dead is not None:
            entry = orjson.loads(dead)
            return fate.model_copy(update={"state": "dead", "reason": entry["reason"], "at": entry["at"]})
        trace = await self.redis.hget(waiting_key(self.group_id, customer), event_id)
        if trace is not None:
            return fate.model_copy(update={"state": "waiting", "trace_id": trace.decode()})
        if await self.replay.applied(customer, event_id):
            return fate.model_copy(update={"state": "evicted"})
        if self.outbox is not None and (trace := self._in_outbox(customer, event_id)):
            return fate.model_copy(update={"state": "accepted", "trace_id": trace})
        return None

    def _in_outbox(self, customer: str, event_id: str) -> str | None:
        """The event's trace id when a post still in the webhook's outbox holds it."""
        for message in self.outbox.unconfirmed(sent_before=float("inf")):
            if event_id not in message.value:
                continue
            post = orjson.loads(message.value)
            for event in post.get("events", []):
                if post.get("customer") == customer and event.get("event_id") == event_id:
                    return event["trace_id"]
        return None
