"""The step's profiler: which share of each step's wall time the engine spent sampling rollouts
for the trainer and the trainer spent computing (both near 1 when the pipeline keeps both busy)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator


class Timeline:
    """When the engine was sampling rollouts for the trainer and when the trainer was computing:
    cut at the end of each step into each one's share of the step's wall time (since the step
    before ended). Overlapping spans of one kind count once."""

    KINDS = ("engine", "trainer")

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.since = clock()
        self.open: dict[str, int] = defaultdict(int)  # spans in progress, per kind
        self.began: dict[str, float] = {}  # when the kind's current busy period began
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

    @contextmanager
    def busy(self, kind: str) -> Iterator[None]:
        if self.open[kind] == 0:
            self.began[kind] = self.clock()
        self.open[kind] += 1
        try:
            yield
        finally:
            self.open[kind] -= 1
            if self.open[kind] == 0:
                self.spans[kind].append((self.began[kind], self.clock()))

    def cut(self) -> tuple[float, dict[str, float]]:
        """Seconds since the last cut, and each kind's busy share of them."""
        now = self.clock()
        window, shares = now - self.since, {}
        for kind in self.KINDS:
            spans = self.spans.pop(kind, []) + ([(self.began[kind], now)] if self.open[kind] else [])
            busy = sum(max(0.0, end - max(start, self.since)) for start, end in spans)
            shares[kind] = busy / window if window > 0 else 0.0
        self.since = now
        return window, shares


