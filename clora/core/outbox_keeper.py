"""The outbox's keeper: confirms what the consumer has stored, sends again what it has not."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge

from clora.core.outbox import Outbox, OutboxMessage

log = logging.getLogger("clora.outbox")
CONFIRMED = Counter("clora_outbox_confirmed_total", "Messages confirmed stored by their consumer", ["outbox"])
RESENT = Counter("clora_outbox_resent_total", "Messages sent to the broker again", ["outbox"])
PENDING = Gauge("clora_outbox_pending", "Accepted messages not yet confirmed by their consumer", ["outbox"])
CHUNK = 1000  # ids looked up per round trip


class OutboxKeeper:
    """Confirms what the consumer has stored, sends again what it has not.

    Every `every_s` the outbox's pending ids are looked up where the consumer records them
    (`stored`): found ones are confirmed (dropped); ones still missing `resend_after_s` after they
    were last sent go to the broker again (`resend`: a broker that restarted empty, a lost
    partition). Consumers are idempotent by id, so a resend of a message that was only slow costs
    a duplicate, never a second record."""

    name = "outbox"

    def __init__(self, outbox: Outbox, every_s: float = 1.0, resend_after_s: float = 30.0):
        self.outbox, self.every_s, self.resend_after_s = outbox, every_s, resend_after_s

    async def stored(self, ids: list[str]) -> set[str]:
        """Which of `ids` the consumer has stored."""
        raise NotImplementedError

    async def resend(self, messages: list[OutboxMessage]) -> None:
        raise NotImplementedError

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the next tick tries again
                log.warning("%s keeper: %s: %s", self.name, type(exc).__name__, exc)

    async def tick(self) -> tuple[int, int]:
        """(confirmed, resent) this round."""
        now = time.time()
        pending = self.outbox.unconfirmed(sent_before=float("inf"))
        PENDING.labels(self.name).set(len(pending))
        if not pending:
            return 0, 0
        stored: set[str] = set()
        for start in range(0, len(pending), CHUNK):
            stored |= await self.stored([m.id for m in pending[start:start + CHUNK]])
        confirmed = await asyncio.to_thread(self.outbox.confirm, stored) if stored else 0
        CONFIRMED.labels(self.name).inc(confirmed)
        stale = [m for m in self.outbox.unconfirmed(sent_before=now - self.resend_after_s) if m.id not in stored]
        if stale:
            log.warning("%s: %d messages not stored by their consumer %.0f s after sending; sending again",
                        self.name, len(stale), self.resend_after_s)
            await self.resend(stale)
            self.outbox.mark_sent([m.id for m in stale], time.time())
            RESENT.labels(self.name).inc(len(stale))
        PENDING.labels(self.name).set(len(self.outbox))
        return confirmed, len(stale)
