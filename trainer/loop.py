"""`clora train`, top to bottom: `main` loads the model, connects, and loops; `drive` picks who
trains next; `step` is one step. What they call is beside this file: the maths (step.py), the
data (data.py, rollouts.py), the versions (versions.py), the tenants' states (adapter_store.py),
the scheduler, the profiler (timeline.py), the step report and metrics (report.py), the model and
its memory policy (model.py), the run's settings (run.py).

  main: recover unpublished checkpoints; then `drive` until stopped.
  drive: wait while serving is busy, let the scheduler pick tenants, run one step for them (a
        step that fails is retried tenant by tenant; a tenant that fails alone is backed off, and
        the others' steps land). Pipelined (the default), the rollouts of the tenants the next
        pick would choose are sampled by the engine while the trainer computes the current step.
        Four or more tenants that sample take turns in halves, so those rollouts come from their
        newest versions (on-policy, as the C-LoRA report's tenants take turns on the trainer); a
        tenant in both picks (fewer tenants) is never sampled ahead (it would be sampled by the
        version being trained): fewer tenants sample together in their step, then train.
        (Rollouts that do lag are trained as off-policy by one version: step.py.)
  step: sample each tenant's rollouts unless sampled ahead, gather its data, copy its state onto
        the device, backward of every loss; then per tenant: skip it if its logprob gap says the
        trainer does not see what the server sampled (the records over the bound are quarantined,
        so the tenant moves on to newer ones; after `max_skipped_steps` skips in a row it is
        halted, /healthz says why), else AdamW, copy back, checkpoint and publish. Its report says
        which share of its wall time the engine spent sampling for the trainer and the trainer
        computing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
import torch
from prometheus_client import start_http_server
from torch import nn

from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.trainer.adapter_store import AdapterStore
from clora.trainer.data import TrainerIO
from clora.trainer.lora import MultiLoRALinear
from clora.trainer.model import load_model, return_freed_host_memory
from clora.trainer.optim import adamw_step
from clora.trainer.report import HALTED, StepReport, log_step, observe
from clora.trainer.rollouts import Rollouts
from clora.trainer.run import TrainRun
from clora.trainer.scheduler import Candidate, Scheduler
from clora.trainer.step import backward
from clora.trainer.timeline import Timeline
from clora.trainer.versions import Publisher

log = logging.getLogger("clora.trainer")


@dataclass
class Trainer:
    """What a step works on: the frozen model and its LoRA layers, the tenants' states, the I/O."""

    model: nn.Module
    layers: dict[str, MultiLoRALinear]
    store: AdapterStore
    io: TrainerIO
    publisher: Publisher
    pass_tokens: int = 512
    timeline: Timeline = field(default_factory=Timeline)


async def main(run: TrainRun) -> None:
    """Until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if run.section.metrics_port:
        try:
            start_http_server(run.section.metrics_port, addr="127.0.0.1")
        except OSError as exc:  # metrics are worth a warning, not the trainer
            log.warning("trainer metrics not served on port %d: %s", run.section.metrics_port, exc)
    async with connect(run) as trainer:
        log.info("trainer up on %s, %s (gateway %s)", run.device, run.dtype, run.gateway_url)
        await trainer.publisher.recover_all()  # checkpoints a previous run wrote but did not get to publish
        await trainer.io.halts.clear()  # a restart (a fixed deployment, say) resumes halted tenants

        async def candidates() -> list[Candidate]:  # serving first: no training while it is saturated
            load = await trainer.io.client.load()
            busy = load.requests_in_flight > run.section.max_inflight or not load.engine_ready
            return [] if busy else await trainer.io.candidates()

        scheduler = Scheduler(run.section.max_tenants, max_skipped_steps=run.section.max_skipped_steps)
        async for _ in drive(trainer, scheduler, candidates, stop, pipeline=run.section.pipeline,
                             idle_s=run.section.idle_s):
            pass


@asynccontextmanager
async def connect(run: TrainRun) -> AsyncIterator[Trainer]:
    """The model, loaded once, and the trainer's connections: Redis (replay buffer, configs,
    customers) and the gateway; closed on exit. Sets this process's torch threads (`run.threads`):
    whatever runs a trainer (`clora train`, the benchmarks) computes with the same threads."""
    if run.threads:
        torch.set_num_threads(run.threads)
    model, layers, tokenizer = await asyncio.to_thread(load_model, run.model_dir, run.device, run.dtype)
    redis = aioredis.Redis.from_url(run.redis_url)
    runtime = RuntimeClient(run.gateway_url, run.admin_key)
    store, configs = AdapterStore(run.trainer_dir, run.device, run.section.keep_checkpoints), TenantConfigStore(redis)
    io = TrainerIO(store, runtime, ReplayBuffer(redis, run.replay_capacity), configs, CustomerStore(redis),
                   tokenizer, served_base=run.served_base)
    try:
        yield Trainer(model, layers, store, io, Publisher(store, runtime, configs, str(run.model_dir)),
                      run.pass_tokens)
    finally:
        await runtime.close()
        await redis.aclose()


async def drive(trainer: Trainer, scheduler: Scheduler, candidates: Callable[[], Awaitable[list[Candidate]]],
                stop: asyncio.Event, *, pipeline: bool = True, idle_s: float = 5.0) -> AsyncIterator[list[StepReport]]:
    """Steps until `stop`, yielding each step's reports: the scheduler picks from `candidates`
    (none: wait `idle_s`). Pipelined, when a step starts the tenants the next pick would choose
    that sample rollouts get them sampled while it computes (one step ahead, no more); the next
    step uses those of the tenants it does pick (a prediction that missed costs engine time, and
    records are never read ahead). Tenants that sample take turns in halves (`halves`), and one in
    this step is not sampled ahead for the next."""
    ahead: asyncio.Task[dict[str, Rollouts]] | None = None
    try:
        while not stop.is_set():
            offered = await candidates()
            limit = halves(offered) if pipeline else None
            chosen = scheduler.pick(offered, limit)
            rollouts = {}
            if ahead is not None:
                rollouts = {c: r for c, r in (await ahead).items() if c in chosen}
                ahead = None
            if not chosen:
                try:
                    await asyncio.wait_for(stop.wait(), idle_s)
                except asyncio.TimeoutError:
                    pass
                trainer.timeline.cut()  # idle time is no step's
                continue
            samples = {c.customer for c in offered if c.samples}
            # A tenant in this step too would be sampled by the version this step replaces.
            following = [c for c in scheduler.peek(offered, limit) if c in samples and c not in chosen] \
                if pipeline else []
            if following:
                ahead = asyncio.create_task(sample_ahead(trainer, following))
            yield await train(trainer, scheduler, chosen, rollouts)
    finally:
        if ahead is not None:
            ahead.cancel()


def halves(offered: list[Candidate]) -> int | None:
    """A step's cap when four or more candidates sample rollouts: half of them (rounded up), so
    that one half's rollouts are sampled while the other half trains and no tenant is in two steps
    in a row (its rollouts never a version behind). Fewer: no cap (None), so that their rollouts
    still share the engine's decode batches (a half of one tenant would sample alone); each is
    then in every step and samples in it (`drive` samples ahead no tenant of the current step:
    one-step-lagged rollouts learned far slower per step, BENCHMARKS.md)."""
    return (len(offered) + 1) // 2 if sum(c.samples for c in offered) >= 4 else None


async def sample(trainer: Trainer, customer: str, keep_weights: bool = False) -> Rollouts:
    """A tenant's rollouts under its newest version; a step whose publish failed is published first
    (it must not be skipped, and its rollouts must come from it)."""
    await trainer.publisher.ensure_published(customer)
    return await trainer.io.rollouts(customer, trainer.layers, keep_weights)


async def sample_ahead(trainer: Trainer, customers: list[str]) -> dict[str, Rollouts]:
    """The next step's rollouts, sampled while the current one computes, each with a copy of the
    weights that sampled it; a tenant whose sampling fails is left to its step to sample."""
    with trainer.timeline.busy("engine"):
        sampled = await asyncio.gather(*[sample(trainer, c, keep_weights=True) for c in customers],
                                       return_exceptions=True)
    out = {}
    for customer, result in zip(customers, sampled):
        if isinstance(result, BaseException):
            log.warning("customer %s: rollouts sampled ahead failed (%s); its step samples again", customer, result)
        else:
            out[customer] = result
    return out


async def train(trainer: Trainer, scheduler: Scheduler, customers: list[str],
                rollouts: dict[str, Rollouts] | None = None) -> list[StepReport]:
    """A step for `customers`; if it fails, each alone, so that only the failing tenant is backed off."""
    rollouts = rollouts or {}
    try:
        reports = await step(trainer, customers, rollouts)
    except Exception:  # noqa: BLE001 - a tenant's failure must not stop the trainer
        if len(customers) == 1:
            delay = scheduler.failed(customers[0])
            log.exception("customer %s: step failed; backing off %.0f s", customers[0], delay)
            return []
        log.exception("step for %d tenants failed; retrying each alone", len(customers))
        reports = []
        for customer in customers:
            alone = {customer: rollouts[customer]} if customer in rollouts else {}
            reports += await train(trainer, scheduler, [customer], alone)
        return reports
    for report in reports:
        observe(report)
        if report.skipped:
            await skipped(trainer, scheduler, report)
        else:
            scheduler.succeeded(report.customer)
            log_step(report)
    return reports


async def skipped(trainer: Trainer, scheduler: Scheduler, report: StepReport) -> None:
    """A skipped step: records quarantined, the tenant tries its newer ones at once; nothing
    quarantined (the gap was its rollouts'), it is backed off. Too many in a row: halted."""
    customer = report.customer
    in_a_row = scheduler.skipped(customer)
    if in_a_row >= scheduler.max_skipped_steps:
        await trainer.io.halts.halt(customer, report.skipped or "", in_a_row)
        HALTED.labels(customer).set(1)
        log.error("customer %s: training halted after %d skipped steps in a row (last: %s); set its trainer config "
                  "again or restart the trainer to resume", customer, in_a_row, report.skipped)
    elif report.quarantined:
        log.warning("customer %s: step %d skipped: %s; %d records quarantined", customer, report.step,
                    report.skipped, report.quarantined)
    else:
        delay = scheduler.failed(customer)
        log.warning("customer %s: step %d skipped: %s; backing off %.0f s", customer, report.step,
                    report.skipped, delay)


async def step(trainer: Trainer, customers: list[str], rollouts: dict[str, Rollouts] | None = None) -> list[StepReport]:
    """One step for several tenants (their rollouts sampled now, unless given: sampled ahead);
    raises if any part fails (no tenant's result is then kept)."""
    started = time.perf_counter()
    io, store, timeline = trainer.io, trainer.store, trainer.timeline
    # 1. Data for each tenant: rollouts (sampled for all tenants concurrently on the server), records.
    rollouts = dict(rollouts or {})
    missing = [c for c in customers if c not in rollouts]
    if missing:
        with timeline.busy("engine"):
            rollouts |= zip(missing, await asyncio.gather(*[sample(trainer, c) for c in missing]))
    data = [d for d in await asyncio.gather(*[io.gather(c, rollouts[c]) for c in customers]) if not d.empty()]
    if not data:
        return []
    gathered = time.perf_counter()
    # 2. Device copies of each tenant's state (a failure below leaves the masters untouched).
    states = {d.customer: store.swap_in(d.customer) for d in data}
    # 3. Every loss's gradients into them (in a thread: the event loop stays responsive).
    with timeline.busy("trainer"):
        results = await asyncio.to_thread(backward, trainer.model, trainer.layers, data, states, trainer.pass_tokens)
        await asyncio.to_thread(return_freed_host_memory)
    computed = time.perf_counter()
    # 4. Per tenant: unless its logprob gap is over its bound (the trainer would be correcting for a
    #    policy that did not sample: skipped, the records kept), AdamW, copy back, checkpoint then
    #    publish, record what the version learnt from. No rollout reads its version meanwhile.
    reports = []
    for d in data:
        state, result = states[d.customer], results[d.customer]
        rewards = [r for g in d.groups for r in g.rewards]
        report = StepReport(d.customer, state.step + 1, None, statistics.fmean(rewards) if rewards else None,
                            len(d.rated), len(d.corrections), result, 0.0, gather_s=gathered - started,
                            backward_s=computed - gathered)
        gap = result.gap.mean
        if gap is not None and gap > d.config.max_logprob_gap:
            report.skipped = (f"logprob gap {gap:.4f} nats (max {result.gap.max:.4f}, {result.gap.tokens} tokens) "
                              f"above max_logprob_gap {d.config.max_logprob_gap}")
            # The records whose own gap is over the bound leave the buffer; the others are read again.
            over = [d.rated[i] for i in result.gap.records_over(d.config.max_logprob_gap)]
            report.quarantined = await io.quarantine(d.customer, over, report.skipped)
        else:
            async with store.lock(d.customer):
                with timeline.busy("trainer"):
                    adamw_step(state, lr=d.config.lr)
                state.published_version = None  # a new step: not published until publish() says so
                state.reward_baseline = d.next_baseline()
                store.swap_out(state)
                report.version = await trainer.publisher.publish(d.customer, switch=not d.config.gated)
            await io.consumed(d, report.version)
        report.seconds = time.perf_counter() - started
        reports.append(report)
    cycle, shares = timeline.cut()
    for report in reports:
        report.cycle_s, report.engine_busy, report.trainer_busy = cycle, shares["engine"], shares["trainer"]
    return reports
