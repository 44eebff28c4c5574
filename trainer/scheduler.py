"""Which tenants train in the next step.

Every tenant with something to learn from (an environment, or enough new feedback) earns credit
each round in proportion to its priority and pending work; the step takes the tenants with the most
credit, up to `max_tenants` (all of them when they fit: one batched step serves them all). A tenant
whose step failed is backed off exponentially, so it never holds up the others; steps skipped in a
row are counted (the loop halts a tenant at `max_skipped_steps`). `peek` says who
the next pick would be, changing nothing: the pipelined loop samples their rollouts ahead.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable


@dataclass
class Candidate:
    customer: str
    work: float  # > 0: something to learn from (1.0 = one full step's worth)
    priority: float = 1.0
    samples: bool = False  # learns from on-policy rollouts (an environment): worth sampling ahead


class Scheduler:
    def __init__(self, max_tenants: int = 8, base_backoff_s: float = 5.0, max_backoff_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, max_skipped_steps: int = 5):
        if max_tenants < 1 or max_skipped_steps < 1:
            raise ValueError("max_tenants and max_skipped_steps must be at least 1")
        self.max_tenants, self.max_skipped_steps = max_tenants, max_skipped_steps
        self.skips: dict[str, int] = defaultdict(int)
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self.clock = clock
        self.credit: dict[str, float] = defaultdict(float)
        self.failures: dict[str, int] = defaultdict(int)
        self.backoff_until: dict[str, float] = {}

    def pick(self, candidates: list[Candidate], limit: int | None = None) -> list[str]:
        """Up to `max_tenants` (and `limit`) tenants for the next step."""
        credit = self._credit(candidates)
        self.credit.update(credit)
        chosen = self._ranked(credit, limit)
        for customer in chosen:
            self.credit[customer] = 0.0
        return chosen

    def peek(self, candidates: list[Candidate], limit: int | None = None) -> list[str]:
        """Who `pick` would choose from these candidates; nothing changes."""
        return self._ranked(self._credit(candidates), limit)

    def _credit(self, candidates: list[Candidate]) -> dict[str, float]:
        """The credit of each ready candidate after this round."""
        now = self.clock()
        ready = [c for c in candidates if c.work > 0 and self.backoff_until.get(c.customer, 0.0) <= now]
        # A backlog counts, but only so much.
        return {c.customer: self.credit[c.customer] + c.priority * min(c.work, 4.0) for c in ready}

    def _ranked(self, credit: dict[str, float], limit: int | None = None) -> list[str]:
        return sorted(credit, key=lambda customer: (-credit[customer], customer))[:min(self.max_tenants,
                                                                                      limit or self.max_tenants)]

    def failed(self, customer: str) -> float:
        """Back the tenant off; returns for how long."""
        self.failures[customer] += 1
        delay = min(self.max_backoff_s, self.base_backoff_s * 2 ** (self.failures[customer] - 1))
        self.backoff_until[customer] = self.clock() + delay
        return delay

    def skipped(self, customer: str) -> int:
        """Counts a skipped step; returns how many in a row (from 1 again once it reaches the limit:
        the tenant is then halted, and a resumed one gets the whole count again)."""
        self.skips[customer] += 1
        in_a_row = self.skips[customer]
        if in_a_row >= self.max_skipped_steps:
            self.skips.pop(customer)
        return in_a_row

    def succeeded(self, customer: str) -> None:
        self.failures.pop(customer, None)
        self.backoff_until.pop(customer, None)
        self.skips.pop(customer, None)
