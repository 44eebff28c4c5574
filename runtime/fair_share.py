"""Fair share of the engine between customers competing for it.

A per-customer concurrency limit only caps a customer; it does not stop one customer's 32 requests
from filling the engine's batch while another customer's single request decodes in it (on two CPU
cores that made the quiet customer's answers 3.7x slower). What a quiet customer waits on is the
batch its tokens decode in, so while a customer uses no more than its share of `budget` requests
in the engine, the others may not go beyond theirs: their requests wait here (not a 429) and are
let in, customers with the fewest in the engine first, as others leave.

Work-conserving: a customer alone may use the engine up to its own concurrency limit (shares
count only customers *competing*: with a request in the engine or waiting, or one within
`window_s`: a client sending one request after another is idle between them for a moment); while
fewer than `budget` requests are in the engine anyone enters; and customers that all want more
than a share are not held back (no one is protected by it). Customers' chat requests only: the
trainer's rollouts and eval sampling (the admin API) are scheduled by the trainer and eval jobs. State is per
gateway process and touched only from its event loop; a request that enters at once costs a few
dictionary operations (no await).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Counter

WAITED = Counter("clora_fair_share_waits_total", "Chat requests that waited for their customer's engine share")


class FairShare:
    def __init__(self, budget: int, window_s: float = 1.0):
        self.budget = budget  # 0: off (everyone enters at once)
        self.window_s = window_s
        self.in_engine: dict[str, int] = {}
        self.total = 0
        self.waiting: dict[str, deque[asyncio.Future]] = {}
        self._last_seen: dict[str, float] = {}

    def try_enter(self, customer: str) -> bool:
        """Enter now if the customer may (True), else the caller waits in `wait_turn`."""
        now = time.monotonic()
        self._last_seen[customer] = now
        if self.waiting.get(customer) or not self._may_enter(customer, now):
            return False
        self._enter(customer)
        return True

    async def wait_turn(self, customer: str) -> None:
        """Wait until let in; a cancelled waiter (the client left) leaves no trace."""
        WAITED.inc()
        turn = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(customer, deque()).append(turn)
        self._wake()  # the window of another customer may have passed since it last left
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # let in just as it was cancelled: give it back
                self.leave(customer)
            else:
                self._forget(customer, turn)
            raise

    def leave(self, customer: str) -> None:
        left = self.in_engine.get(customer, 1) - 1
        if left:
            self.in_engine[customer] = left
        else:
            self.in_engine.pop(customer, None)
        self.total -= 1
        self._last_seen[customer] = time.monotonic()
        self._wake()

    def share(self, now: float | None = None) -> int | None:
        """Requests in the engine each competing customer may have (None: one customer alone)."""
        competing = self._competing(time.monotonic() if now is None else now)
        return None if competing <= 1 else max(1, self.budget // competing)

    # -- internals ----------------------------------------------------------------------------
    def _may_enter(self, customer: str, now: float) -> bool:
        if not self.budget or self.total < self.budget:
            return True
        share = self.share(now)
        if share is None or self.in_engine.get(customer, 0) < share:
            return True
        # Over its share: held back only for a competing customer that uses no more than its own
        # (customers that all ask for more than a share keep the engine's batch as full as they
        # like: holding them to `budget` would cost throughput and protect no one).
        return not any(self.in_engine.get(other, 0) <= share for other in self._last_seen if other != customer)

    def _competing(self, now: float) -> int:
        horizon = now - self.window_s
        stale = [c for c, seen in self._last_seen.items()
                 if seen < horizon and not self.in_engine.get(c) and not self.waiting.get(c)]
        for c in stale:  # pruned here: the dict holds only customers seen within the window
            del self._last_seen[c]
        return len(self._last_seen)

    def _enter(self, customer: str) -> None:
        self.in_engine[customer] = self.in_engine.get(customer, 0) + 1
        self.total += 1

    def _wake(self) -> None:
        now = time.monotonic()
        while self.waiting:
            ready = [c for c in sorted(self.waiting, key=lambda c: self.in_engine.get(c, 0))
                     if self._may_enter(c, now)]
            if not ready:
                return
            customer = ready[0]
            queue = self.waiting[customer]
            turn = queue.popleft()
            if not queue:
                del self.waiting[customer]
            if turn.done():  # cancelled while queued
                continue
            self._enter(customer)
            turn.set_result(None)

    def _forget(self, customer: str, turn: asyncio.Future) -> None:
        queue = self.waiting.get(customer)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self.waiting[customer]
        self._wake()
