"""Freshness: how long after its 202 a correction is served by a version trained on it.

N feedback-only customers each send an operator correction of a served answer every
`interval_s` on average (Poisson); `clora train`'s loop trains them with its own candidates (a
customer trains at `min_records` new records or when its oldest has waited `max_record_wait_s`)
and its own idle pause (`CLORA_TRAINER_IDLE_S`). An event's freshness is the time from its 202 to
when the replay buffer shows a version that trained on it (published, and served: nothing is
gated here), polled every 0.25 s.

Alone, the customers send for `seconds`. Under load, RL experiments train in the same loop
meanwhile (`run_experiments` with the feedback customers beside them) and the customers send for
`seconds` or until those experiments finish, whichever comes first: every event is trained by a
trainer that is also busy with RL tenants, as in a deployment where both kinds of customer share
it. The experiments are stopped once every event is fresh (their rewards are not the point).
Each event's live answer is timed too (`chat_p50_s`, `chat_max_s`); one that fails (a timeout
after 60 s, a 5xx) is counted in `chat_failed` and that customer goes on: the first sweep with
8 RL experiments died on such a timeout, losing 90 minutes of measurements. Events not trained on
within `FRESH_WAIT_S` of the last one sent are counted (`not_fresh`), not waited for: the second
sweep died there (8 RL experiments training, 600 s), losing 103 minutes.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import aclosing
from typing import Any, Awaitable, Callable

import httpx

from clora.bench.harness import BenchRuntime, TrainerProcess
from clora.trainer.loop import Trainer, drive
from clora.trainer.scheduler import Candidate, Scheduler

FRESH_WAIT_S = 600.0  # after the last event is sent, how long the others may take to be trained on


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def train_until_stopped(trainer: Trainer, advance: Callable[[int], None], stop: asyncio.Event,
                              customers: list[str], max_tenants: int, idle_s: float) -> None:
    """`clora train`'s loop with its own candidates, for `customers` only (a job of the trainer process)."""
    async def candidates() -> list[Candidate]:
        return [c for c in await trainer.io.candidates() if c.customer in customers]

    async with aclosing(drive(trainer, Scheduler(max_tenants), candidates, stop, idle_s=idle_s)) as driven:
        async for _ in driven:
            pass


async def measure(runtime: BenchRuntime, trainer: TrainerProcess, customers: list[str], *, interval_s: float,
                  seconds: float, training: Callable[[Callable[[int], None]], Awaitable[Any]],
                  load_steps: int = 0) -> tuple[dict, Any]:
    """Feedback from `customers` while the trainer process runs `training(progress)` (a
    `trainer.run` of a job that trains them), then the events' freshness and the job's result.
    `load_steps`: the RL steps the job runs beside them; feedback is sent for `seconds` or until
    they are done."""
    loop, rng = asyncio.get_running_loop(), random.Random(0)
    sent_all, load_done, done_steps = asyncio.Event(), asyncio.Event(), [0]
    accepted: dict[tuple[str, str], float] = {}
    chat_s: list[float] = []  # the live answers' latencies (served, under the load)
    chat_failed: list[str] = []  # answers that did not come (timeout, 5xx): counted, the run goes on
    fresh: dict[tuple[str, str], float] = {}

    def progress(n: int) -> None:  # called on the trainer process's reader thread
        done_steps[0] += n
        if load_steps and done_steps[0] >= load_steps:
            loop.call_soon_threadsafe(load_done.set)

    def sending() -> bool:  # a job that ended early (failed) ends the sending: `await job` raises below
        if job.done():
            return False
        return time.monotonic() < deadline and not load_done.is_set()

    async def customer_feedback(http: httpx.AsyncClient, customer: str) -> None:
        key = {"Authorization": f"Bearer {runtime.keys[customer]}"}
        first = True
        while sending():
            # Under load each customer's first event goes at once: it is sent while the RL
            # experiments train however short they are (a quick sweep's take seconds).
            await asyncio.sleep(0.0 if first and load_steps else rng.expovariate(1 / interval_s))
            first = False
            if not sending():
                return
            asked = time.monotonic()
            try:
                chat = await http.post("/v1/chat/completions", headers=key, json={
                    "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
                chat.raise_for_status()
            except httpx.HTTPError as exc:  # a live answer that never came is a finding, not the run's end
                chat_failed.append(f"{type(exc).__name__} after {time.monotonic() - asked:.1f} s")
                continue
            chat_s.append(time.monotonic() - asked)
            correction = {"trace_id": chat.headers["x-clora-trace-id"], "source": "operator",
                          "correction": {"role": "assistant", "content": "Hello! How can I help you today?"}}
            sent = await http.post("/v1/feedback", headers=key, json=correction)
            sent.raise_for_status()
            accepted[(customer, sent.json()["event_ids"][0])] = time.monotonic()

    async def watch() -> None:
        while not sent_all.is_set() or len(fresh) < len(accepted):
            for event in [e for e in accepted if e not in fresh]:
                if await runtime.replay.consumed_by(*event):
                    fresh[event] = time.monotonic() - accepted[event]
            await asyncio.sleep(0.25)

    deadline = time.monotonic() + seconds
    job = asyncio.create_task(training(progress))
    watcher = asyncio.create_task(watch())
    try:
        async with httpx.AsyncClient(base_url=runtime.stack.gateway_url, timeout=60) as http:
            await asyncio.gather(*[customer_feedback(http, c) for c in customers])
        sent_all.set()  # the last events train within `max_record_wait_s` and a step
        try:
            await asyncio.wait_for(asyncio.shield(watcher), timeout=FRESH_WAIT_S)
        except asyncio.TimeoutError:
            pass  # counted below as not fresh
    finally:
        watcher.cancel()
        trainer.stop()
        result = await job
    if not accepted:
        raise RuntimeError("no feedback event was sent: raise --freshness-s (or lower --freshness-interval-s)")
    seconds_each = list(fresh.values())
    rounded = (lambda q: round(percentile(seconds_each, q), 2) if seconds_each else None)  # noqa: E731
    return {"events": len(seconds_each), "not_fresh": len(accepted) - len(fresh), "wait_s": FRESH_WAIT_S,
            "p50_s": rounded(0.5), "p99_s": rounded(0.99), "max_s": rounded(1.0),
            "chat_answered": len(chat_s), "chat_p50_s": round(percentile(chat_s, 0.5), 2),
            "chat_max_s": round(max(chat_s), 2), "chat_failed": len(chat_failed),
            "chat_failures": chat_failed[:20]}, result
