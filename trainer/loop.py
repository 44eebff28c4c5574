"""`clora train`, top to bottom: `main` loads the model, connects, and loops; `step` is one step.

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
  step: sample each tenant's rollouts unless sampled ahead, gather its data (data.py), copy its
        state onto the device, backward of every loss (step.py); then per tenant: skip it if its
        logprob gap says the trainer does not see what the server sampled (the records over the
        bound are quarantined, so the tenant moves on to newer ones; after
        `max_skipped_steps` skips in a row it is halted, /healthz says why), else AdamW, copy
        back, checkpoint and publish (data.py). Its report says which share of its wall time the engine
        spent sampling for the trainer and the trainer computing (`Timeline`).

Everything it runs with is one frozen `TrainRun`, resolved once by the command.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import statistics
import time
from collections import defaultdict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import redis.asyncio as aioredis
import torch
from prometheus_client import Counter, Gauge, start_http_server
from torch import nn

from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.settings import Settings
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.trainer.adapter_store import AdapterStore
from clora.trainer.data import Rollouts, TrainerIO
from clora.trainer.lora import MultiLoRALinear, inject
from clora.trainer.optim import adamw_step
from clora.trainer.scheduler import Candidate, Scheduler
from clora.trainer.step import TenantResult, backward

log = logging.getLogger("clora.trainer")
STEPS = Counter("clora_trainer_steps_total", "Tenant steps by outcome", ["customer", "outcome"])
RECORDS = Counter("clora_trainer_records_total", "Production records trained on, by loss path (importance, "
                  "ratio_free: rated answers; correction: SFT)", ["customer", "path"])
GAP = Gauge("clora_trainer_logprob_gap_nats", "|trainer - vLLM| logprob on tokens the trained weights sampled, "
            "last step", ["customer", "stat"])
QUARANTINED = Counter("clora_trainer_quarantined_records_total", "Records moved to the replay buffer's quarantine: "
                      "their logprob gap was over the tenant's bound", ["customer"])
HALTED = Gauge("clora_trainer_halted", "1 while the tenant's training is halted (skipped steps in a row)",
               ["customer"])


@dataclass(frozen=True)
class TrainRun:
    """What `clora train` runs with, resolved once (`CLORA_TRAINER_*` and where the runtime is)."""

    gateway_url: str
    redis_url: str
    admin_key: str
    model_dir: Path
    device: str  # cpu, cuda, cuda:N
    dtype: str  # of the base model: float32, bfloat16
    pass_tokens: int  # tokens per batched pass
    trainer_dir: Path  # tenants' states and checkpoints
    keep_checkpoints: int  # per tenant
    replay_capacity: int
    max_tenants: int  # trained together in one step
    idle_s: float  # pause when nobody has anything to learn
    max_inflight: int  # serving requests in flight above which training waits
    served_base: str = "base"  # the base model's name on the server
    metrics_port: int = 0  # Prometheus endpoint; 0: none
    pipeline: bool = True  # sample the next step's rollouts while the current step computes
    threads: int = 0  # torch threads; 0: torch's default (resolved by from_settings)
    max_skipped_steps: int = 5  # a tenant's steps skipped in a row (logprob gap) before it is halted

    @classmethod
    def from_settings(cls, settings: Settings, *, gateway_url: str, redis_url: str, model_dir: str | Path,
                      admin_key: str) -> TrainRun:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") \
            if settings.trainer_device == "auto" else torch.device(settings.trainer_device)
        dtype = settings.trainer_dtype if settings.trainer_dtype != "auto" else \
            "bfloat16" if device.type == "cuda" else settings.dtype
        return cls(gateway_url, redis_url, admin_key, Path(model_dir), str(device), dtype,
                   settings.trainer_pass_tokens or (65536 if device.type == "cuda" else 512),
                   settings.trainer_dir, settings.trainer_keep_checkpoints, settings.replay_capacity,
                   settings.trainer_max_tenants, settings.trainer_idle_s, settings.trainer_max_inflight,
                   settings.served_base_name, settings.trainer_metrics_port, settings.trainer_pipeline,
                   settings.trainer_threads or trainer_threads(device.type), settings.trainer_max_skipped_steps)


def trainer_threads(device_type: str) -> int:
    """CLORA_TRAINER_THREADS=0's choice: on CPU every core but the engine's (it computes on one);
    on 2 cores a second torch thread slowed the engine and the trainer alike (engine 62.8 -> 93.2 s,
    trainer 94.8 -> 124.3 s on a fixed co-located workload: benchmarks/results/trainer_threads.json).
    On a GPU the trainer's CPU threads hardly compute: torch's default (0)."""
    return max(1, (os.cpu_count() or 2) - 1) if device_type == "cpu" else 0


MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed; blocks above it (logits chunks) are mmapped


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> None:
    """Activations from the heap, at a threshold glibc will not move. glibc raises its mmap
    threshold to the size of each large block freed, after which the heap fragments and keeps
    what it holds (a 20-step agent RL run was OOM-killed at 20 GB). Fixing it low (128 KB, the
    earlier policy) kept memory down but made every activation a fresh mmap, faulted in and
    zeroed page by page: 6.0M page faults and 8 s of system time in a 21 s step (SmolLM2-135M,
    bfloat16, one tenant's two agent groups). Fixed at 32 MB, with the heap trimmed after each
    step (`return_freed_host_memory`): 0.5-1.2M faults, 14-16 s, 1.5 GB resident between steps,
    peak 4.8-5.0 GB (benchmarks/trainer_memory.py). No-op where glibc is absent."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (setting it also stops glibc moving it)


def return_freed_host_memory() -> None:
    """The heap's free pages back to the system (every arena), between steps: what a step's
    activations took is not held while the trainer waits, and the next step's heap is warm only
    where it is still in use."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load_model(model_dir: Path, device: str, dtype: str = "float32") -> tuple[nn.Module, dict[str, MultiLoRALinear], object]:
    """The base model, loaded once and frozen, in `dtype`, with every target projection LoRA-wrapped
    (adapters stay float32: the LoRA matmuls cast them; logprobs are float32 whatever the dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix_mmap_threshold()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, inject(model), AutoTokenizer.from_pretrained(model_dir)


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


@dataclass
class Trainer:
    """What a step works on: the frozen model and its LoRA layers, the tenants' states, the I/O."""

    model: nn.Module
    layers: dict[str, MultiLoRALinear]
    store: AdapterStore
    io: TrainerIO
    pass_tokens: int = 512
    timeline: Timeline = field(default_factory=Timeline)


@dataclass
class StepReport:
    customer: str
    step: int
    version: str | None  # None: skipped
    mean_reward: float | None  # on-policy samples of this step (before the update)
    rated: int
    corrections: int
    result: TenantResult  # losses, records per loss path, logprob gap
    seconds: float
    skipped: str | None = None  # why the step was not applied
    quarantined: int = 0  # records of a skipped step moved to the buffer's quarantine
    # Where the step's time went (the same for every tenant of a step): sampling and reading data
    # (the engine's part), the backward (the trainer's), then optimizer, checkpoint and publish.
    gather_s: float = 0.0
    backward_s: float = 0.0
    # Since the previous step ended: wall seconds, and the share of them the engine spent sampling
    # rollouts for the trainer and the trainer computing (both near 1: the pipeline keeps both busy).
    cycle_s: float = 0.0
    engine_busy: float = 0.0
    trainer_busy: float = 0.0


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
            rollouts |= zip(missing, await asyncio.gather(*[io.rollouts(c, trainer.layers) for c in missing]))
    data = [d for d in await asyncio.gather(*[io.gather(c, trainer.layers, rollouts[c]) for c in customers])
            if not d.empty()]
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
            async with io.policy_locks[d.customer]:
                with timeline.busy("trainer"):
                    adamw_step(state, lr=d.config.lr)
                state.published_version = None  # a new step: not published until publish() says so
                state.reward_baseline = d.next_baseline()
                store.swap_out(state)
                report.version = await io.publish(d.customer, switch=not d.config.gated)
            await io.consumed(d, report.version)
        report.seconds = time.perf_counter() - started
        reports.append(report)
    cycle, shares = timeline.cut()
    for report in reports:
        report.cycle_s, report.engine_busy, report.trainer_busy = cycle, shares["engine"], shares["trainer"]
    return reports


async def sample_ahead(trainer: Trainer, customers: list[str]) -> dict[str, Rollouts]:
    """The next step's rollouts, sampled while the current one computes, each with a copy of the
    weights that sampled it; a tenant whose sampling fails is left to its step to sample."""
    with trainer.timeline.busy("engine"):
        sampled = await asyncio.gather(*[trainer.io.rollouts(c, trainer.layers, keep_weights=True)
                                         for c in customers], return_exceptions=True)
    out = {}
    for customer, result in zip(customers, sampled):
        if isinstance(result, BaseException):
            log.warning("customer %s: rollouts sampled ahead failed (%s); its step samples again", customer, result)
        else:
            out[customer] = result
    return out


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
            if pipeline and (following := [c for c in scheduler.peek(offered, limit) if c in samples and c not in chosen]):
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
            continue
        scheduler.succeeded(report.customer)
        reward = f"{report.mean_reward:.3f}" if report.mean_reward is not None else "-"
        gap = report.result.gap
        lagged = f", {report.result.lagged_groups} groups off-policy by one version" if report.result.lagged_groups else ""
        log.info("customer %s: step %d -> %s (reward %s, %d rated %s, %d corrections, logprob gap %s%s, %.1f s: "
                 "data %.1f, backward %.1f; engine busy %.0f%%, trainer busy %.0f%% of %.1f s)", report.customer,
                 report.step, report.version, reward, report.rated, report.result.paths or "", report.corrections,
                 f"{gap.mean:.4f}/{gap.max:.4f}" if gap.mean is not None else "-", lagged, report.seconds,
                 report.gather_s, report.backward_s, 100 * report.engine_busy, 100 * report.trainer_busy,
                 report.cycle_s)
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


def observe(report: StepReport) -> None:
    """The step's outcome, records per loss path and logprob gap, as metrics."""
    STEPS.labels(report.customer, "skipped" if report.skipped else "published").inc()
    if report.quarantined:
        QUARANTINED.labels(report.customer).inc(report.quarantined)
    for path, count in report.result.paths.items():
        RECORDS.labels(report.customer, path).inc(count)
    gap = report.result.gap
    if gap.mean is not None:
        GAP.labels(report.customer, "mean").set(gap.mean)
        GAP.labels(report.customer, "max").set(gap.max)


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
    store = AdapterStore(run.trainer_dir, run.device, run.keep_checkpoints)
    io = TrainerIO(store, runtime, ReplayBuffer(redis, run.replay_capacity), TenantConfigStore(redis),
                   CustomerStore(redis), tokenizer, base_model=str(run.model_dir), served_base=run.served_base)
    try:
        yield Trainer(model, layers, store, io, run.pass_tokens)
    finally:
        await runtime.close()
        await redis.aclose()


async def main(run: TrainRun) -> None:
    """Until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if run.metrics_port:
        try:
            start_http_server(run.metrics_port, addr="127.0.0.1")
        except OSError as exc:  # metrics are worth a warning, not the trainer
            log.warning("trainer metrics not served on port %d: %s", run.metrics_port, exc)
    async with connect(run) as trainer:
        log.info("trainer up on %s, %s (gateway %s)", run.device, run.dtype, run.gateway_url)
        await trainer.io.recover_all()  # checkpoints a previous run wrote but did not get to publish
        await trainer.io.halts.clear()  # a restart (a fixed deployment, say) resumes halted tenants

        async def candidates() -> list[Candidate]:  # serving first: no training while it is saturated
            load = await trainer.io.client.load()
            busy = load.requests_in_flight > run.max_inflight or not load.engine_ready
            return [] if busy else await trainer.io.candidates()

        scheduler = Scheduler(run.max_tenants, max_skipped_steps=run.max_skipped_steps)
        async for _ in drive(trainer, scheduler, candidates, stop, pipeline=run.pipeline,
                             idle_s=run.idle_s):
            pass
