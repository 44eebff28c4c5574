"""`clora train`, top to bottom: `main` loads the model, connects, and loops; `step` is one step.

  main: recover unpublished checkpoints; then, until stopped: wait while serving is busy, let the
        scheduler pick tenants, run one step for them (a step that fails is retried tenant by
        tenant; a tenant that fails alone is backed off, and the others' steps land).
  step: gather each tenant's data (data.py), copy its state onto the device, backward of every
        loss (step.py); then per tenant: skip it if its logprob gap says the trainer does not see
        what the server sampled, else AdamW, copy back, checkpoint and publish (data.py).

Everything it runs with is one frozen `TrainRun`, resolved once by the command.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

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
from clora.trainer.data import TrainerIO
from clora.trainer.lora import MultiLoRALinear, inject
from clora.trainer.optim import adamw_step
from clora.trainer.scheduler import Scheduler
from clora.trainer.step import TenantResult, backward

log = logging.getLogger("clora.trainer")
STEPS = Counter("clora_trainer_steps_total", "Tenant steps by outcome", ["customer", "outcome"])
RECORDS = Counter("clora_trainer_records_total", "Production records trained on, by loss path (importance, "
                  "ratio_free: rated answers; correction: SFT)", ["customer", "path"])
GAP = Gauge("clora_trainer_logprob_gap_nats", "|trainer - vLLM| logprob on tokens the trained weights sampled, "
            "last step", ["customer", "stat"])


@dataclass(frozen=True)
class TrainRun:
    """What `clora train` runs with, resolved once (`CLORA_TRAINER_*` and where the runtime is)."""

    gateway_url: str
    redis_url: str
    admin_key: str
    model_dir: Path
    device: str  # cpu, cuda, cuda:N
    pass_tokens: int  # tokens per batched pass
    trainer_dir: Path  # tenants' states and checkpoints
    keep_checkpoints: int  # per tenant
    replay_capacity: int
    max_tenants: int  # trained together in one step
    idle_s: float  # pause when nobody has anything to learn
    max_inflight: int  # serving requests in flight above which training waits
    served_base: str = "base"  # the base model's name on the server
    metrics_port: int = 0  # Prometheus endpoint; 0: none

    @classmethod
    def from_settings(cls, settings: Settings, *, gateway_url: str, redis_url: str, model_dir: str | Path,
                      admin_key: str) -> TrainRun:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") \
            if settings.trainer_device == "auto" else torch.device(settings.trainer_device)
        return cls(gateway_url, redis_url, admin_key, Path(model_dir), str(device),
                   settings.trainer_pass_tokens or (65536 if device.type == "cuda" else 512),
                   settings.trainer_dir, settings.trainer_keep_checkpoints, settings.replay_capacity,
                   settings.trainer_max_tenants, settings.trainer_idle_s, settings.trainer_max_inflight,
                   settings.served_base_name, settings.trainer_metrics_port)


def load_model(model_dir: Path, device: str) -> tuple[nn.Module, dict[str, MultiLoRALinear], object]:
    """The base model, loaded once and frozen, with every target projection LoRA-wrapped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, inject(model), AutoTokenizer.from_pretrained(model_dir)


@dataclass
class Trainer:
    """What a step works on: the frozen model and its LoRA layers, the tenants' states, the I/O."""

    model: nn.Module
    layers: dict[str, MultiLoRALinear]
    store: AdapterStore
    io: TrainerIO
    pass_tokens: int = 512


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
    # Where the step's time went (the same for every tenant of a step): sampling and reading data
    # (the engine's part), the backward (the trainer's), then optimizer, checkpoint and publish.
    gather_s: float = 0.0
    backward_s: float = 0.0


async def step(trainer: Trainer, customers: list[str]) -> list[StepReport]:
    """One step for several tenants; raises if any part fails (no tenant's result is then kept)."""
    started = time.perf_counter()
    io, store = trainer.io, trainer.store
    # 1. Data for each tenant (sampling for all tenants runs concurrently on the server).
    data = [d for d in await asyncio.gather(*[io.gather(c, trainer.layers) for c in customers]) if not d.empty()]
    if not data:
        return []
    gathered = time.perf_counter()
    # 2. Device copies of each tenant's state (a failure below leaves the masters untouched).
    states = {d.customer: store.swap_in(d.customer) for d in data}
    # 3. Every loss's gradients into them (in a thread: the event loop stays responsive).
    results = await asyncio.to_thread(backward, trainer.model, trainer.layers, data, states, trainer.pass_tokens)
    computed = time.perf_counter()
    # 4. Per tenant: unless its logprob gap is over its bound (the trainer would be correcting for a
    #    policy that did not sample: skipped, the records kept), AdamW, copy back, checkpoint then
    #    publish, record what the version learnt from.
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
        else:
            adamw_step(state, lr=d.config.lr)
            state.published_version = None  # a new step: not published until publish() says so
            state.reward_baseline = d.next_baseline()
            store.swap_out(state)
            report.version = await io.publish(d.customer, switch=not d.config.gated)
            await io.consumed(d, report.version)
        report.seconds = time.perf_counter() - started
        reports.append(report)
    return reports


async def train(trainer: Trainer, scheduler: Scheduler, customers: list[str]) -> None:
    """A step for `customers`; if it fails, each alone, so that only the failing tenant is backed off."""
    try:
        reports = await step(trainer, customers)
    except Exception:  # noqa: BLE001 - a tenant's failure must not stop the trainer
        if len(customers) == 1:
            delay = scheduler.failed(customers[0])
            log.exception("customer %s: step failed; backing off %.0f s", customers[0], delay)
            return
        log.exception("step for %d tenants failed; retrying each alone", len(customers))
        for customer in customers:
            await train(trainer, scheduler, [customer])
        return
    for report in reports:
        observe(report)
        if report.skipped:
            delay = scheduler.failed(report.customer)
            log.warning("customer %s: step %d skipped: %s; backing off %.0f s", report.customer, report.step,
                        report.skipped, delay)
            continue
        scheduler.succeeded(report.customer)
        reward = f"{report.mean_reward:.3f}" if report.mean_reward is not None else "-"
        gap = report.result.gap
        log.info("customer %s: step %d -> %s (reward %s, %d rated %s, %d corrections, logprob gap %s, %.1f s: "
                 "data %.1f, backward %.1f)", report.customer, report.step, report.version, reward, report.rated,
                 report.result.paths or "", report.corrections,
                 f"{gap.mean:.4f}/{gap.max:.4f}" if gap.mean is not None else "-", report.seconds, report.gather_s,
                 report.backward_s)


def observe(report: StepReport) -> None:
    """The step's outcome, records per loss path and logprob gap, as metrics."""
    STEPS.labels(report.customer, "skipped" if report.skipped else "published").inc()
    for path, count in report.result.paths.items():
        RECORDS.labels(report.customer, path).inc(count)
    gap = report.result.gap
    if gap.mean is not None:
        GAP.labels(report.customer, "mean").set(gap.mean)
        GAP.labels(report.customer, "max").set(gap.max)


async def main(run: TrainRun) -> None:
    """Until SIGINT or SIGTERM."""
    # The model, once; then the connections: Redis (replay buffer, configs, customers), the gateway.
    model, layers, tokenizer = await asyncio.to_thread(load_model, run.model_dir, run.device)
    redis = aioredis.Redis.from_url(run.redis_url)
    runtime = RuntimeClient(run.gateway_url, run.admin_key)
    store = AdapterStore(run.trainer_dir, run.device, run.keep_checkpoints)
    io = TrainerIO(store, runtime, ReplayBuffer(redis, run.replay_capacity), TenantConfigStore(redis),
                   CustomerStore(redis), tokenizer, base_model=str(run.model_dir), served_base=run.served_base)
    trainer = Trainer(model, layers, store, io, run.pass_tokens)
    scheduler = Scheduler(run.max_tenants)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if run.metrics_port:
        try:
            start_http_server(run.metrics_port, addr="127.0.0.1")
        except OSError as exc:  # metrics are worth a warning, not the trainer
            log.warning("trainer metrics not served on port %d: %s", run.metrics_port, exc)
    log.info("trainer up on %s (gateway %s)", run.device, run.gateway_url)
    try:
        await io.recover_all()  # checkpoints a previous run wrote but did not get to publish
        while not stop.is_set():
            load = await runtime.load()  # serving first: no training while it is saturated
            busy = load["requests_in_flight"] > run.max_inflight or not load["engine_ready"]
            chosen = [] if busy else scheduler.pick(await io.candidates())
            if not chosen:
                try:
                    await asyncio.wait_for(stop.wait(), run.idle_s)
                except asyncio.TimeoutError:
                    pass
                continue
            await train(trainer, scheduler, chosen)
    finally:
        await runtime.close()
        await redis.aclose()
