"""Composition root of `clora serve`: wires services, engine, router, capture, gateway and the
feedback webhook.

The only place that knows every component (top layer: it imports the stages, no stage imports
it); each component gets just the values it uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import uvicorn

from clora.core.customers import CustomerStore
from clora.core.halts import TrainingHalts
from clora.core.models import resolve_model
from clora.core.outbox import Outbox
from clora.core.processes import ChildProcess, free_port
from clora.core.services import EmbeddedService, start_broker, start_redis
from clora.core.settings import FeedbackSettings, Settings, StoreSettings
from clora.core.state import admin_key, trace_secret
from clora.core.tenant_configs import TenantConfigStore
from clora.core.traces import TraceSigner
from clora.evals.gate import EvalHistory
from clora.evals.job import EvalJob
from clora.evals.suites import SuiteStore
from clora.feedback.consumer import IngestConfig, IngestConsumer
from clora.feedback.fates import EventFates, dead_key, waiting_key
from clora.feedback.outbox_keeper import FeedbackOutboxKeeper
from clora.feedback.replay import ReplayBuffer, ReplayReport
from clora.feedback.webhook import FeedbackPublisher, WebhookLimits, mount_feedback
from clora.runtime.adapters import AdapterRegistry
from clora.runtime.capture import Capture, InteractionOutboxKeeper
from clora.runtime.engine.config import EngineConfig
from clora.runtime.engine.manager import EngineManager
from clora.runtime.gateway import GatewayConfig, create_app
from clora.runtime.limits import Limits, LimitStore
from clora.runtime.routing import Router
from clora.runtime.spool import Spool

log = logging.getLogger("clora.stack")


def ingest_config(stores: StoreSettings, feedback: FeedbackSettings, bootstrap: str) -> IngestConfig:
    return IngestConfig(bootstrap=bootstrap, interactions_topic=stores.interactions_topic,
                        feedback_topic=stores.feedback_topic, dead_letter_topic=stores.dead_letter_topic,
                        group_id=feedback.ingest_group, partitions=stores.topic_partitions,
                        interaction_ttl_s=feedback.interaction_ttl_s, max_wait_s=feedback.max_wait_s,
                        fetch_wait_s=feedback.ingest_fetch_wait_s, max_poll_records=feedback.ingest_max_poll_records,
                        max_lag=feedback.ingest_max_lag)


def redis_url(settings: Settings, log_dir: Path) -> tuple[str, EmbeddedService | None]:
    if settings.stores.redis_url:
        return settings.stores.redis_url, None
    service = start_redis(settings.home / "redis", log_dir)
    return service.url, service


def kafka_bootstrap(settings: Settings, log_dir: Path) -> tuple[str, EmbeddedService | None]:
    if settings.stores.kafka_bootstrap:
        return settings.stores.kafka_bootstrap, None
    service = start_broker(log_dir)
    return service.url, service


@dataclass
class Stack:
    settings: Settings
    run_dir: Path = field(init=False)
    services: list[EmbeddedService] = field(default_factory=list)
    engine: EngineManager | None = None
    capture: Capture | None = None
    feedback: FeedbackPublisher | None = None
    outbox: Outbox | None = None
    keeper_task: asyncio.Task | None = None
    capture_keeper_task: asyncio.Task | None = None
    ingest: IngestConsumer | None = None
    ingest_task: asyncio.Task | None = None
    routes_task: asyncio.Task | None = None  # routes set through other gateways on this Redis
    redis: aioredis.Redis | None = None
    server: uvicorn.Server | None = None
    gateway_url: str = ""
    model: str = ""
    trainer: ChildProcess | None = None
    redis_url: str = ""
    kafka_bootstrap: str = ""
    evals: EvalJob | None = None
    trainer_watch: asyncio.Task | None = None
    evals_task: asyncio.Task | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.run_dir = self.settings.runs_dir / time.strftime("%Y%m%d-%H%M%S")

    async def start(self) -> None:
        """Everything up, in dependency order; a failure stops what already started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.redis_url, redis_service = redis_url(s, self.run_dir)
        self.services += [redis_service] if redis_service else []
        self.kafka_bootstrap, broker = kafka_bootstrap(s, self.run_dir)
        self.services += [broker] if broker else []
        model = str(await asyncio.to_thread(resolve_model, s.serving.model, s.cache_dir))
        self.model = model

        self.redis = aioredis.Redis.from_url(self.redis_url)
        customers = CustomerStore(self.redis)
        registry = AdapterRegistry(self.redis, s.adapters_dir, s.serving.adapter_keep_versions)
        engine_config = EngineConfig.from_settings(s.serving, model, self.run_dir, s.cache_dir)
        self.engine = EngineManager(engine_config)
        router = Router(registry, self.engine, validate=engine_config.validate_adapter)
        await router.restore()
        self.routes_task = asyncio.create_task(router.follow(self._stopping), name="routes")
        self.engine.on_ready = router.reload_all
        spool = Spool(s.spool_dir, s.serving.spool_max_bytes)
        self.capture = Capture(self.kafka_bootstrap, s.stores.interactions_topic, spool,
                               queue_size=s.serving.capture_queue_size, partitions=s.stores.topic_partitions,
                               batch_s=s.serving.capture_batch_s, journal_wait_s=s.serving.capture_journal_wait_s,
                               outbox=Outbox(s.capture_outbox_dir, s.serving.capture_outbox_max_bytes,
                                             sync_every_s=s.serving.capture_sync_every_s)).start()
        await self.engine.start()

        config = GatewayConfig(base_model=model, served_base_name=s.serving.served_base_name,
                               max_request_bytes=s.serving.max_request_bytes, admin_key=admin_key(s),
                               upstream_timeout_s=s.serving.upstream_timeout_s,
                               max_tokens_cap=s.serving.max_tokens_cap or None,
                               limits=Limits(s.serving.customer_max_concurrent, s.serving.customer_requests_per_s,
                                             s.serving.customer_tokens_per_min),
                               fair_share_requests=s.serving.fair_share_requests)
        traces = TraceSigner(trace_secret(s))
        replay = ReplayBuffer(self.redis, s.feedback.replay_capacity, s.feedback.replay_min_share)
        self.ingest = IngestConsumer(ingest_config(s.stores, s.feedback, self.kafka_bootstrap), self.redis, replay)
        self.outbox = Outbox(s.outbox_dir, s.feedback.outbox_max_bytes)
        fates = EventFates(self.redis, s.feedback.ingest_group, replay, self.outbox)

        async def replay_report(customer: str, newest: int) -> ReplayReport:
            report = await replay.report(customer, newest)
            report.stats.waiting, report.stats.dead_lettered = await fates.counts(customer)
            return report
        app = create_app(config, customers, router, self.engine, self.capture, traces,
                         configs=TenantConfigStore(self.redis), validate_lora=engine_config.validate_lora,
                         health_checks={"ingestion": self.ingest.health,
                                        "training": TrainingHalts(self.redis).health}, replay_report=replay_report,
                         purge_customer=lambda customer: self._purge(customer, replay), event_fate=fates.lookup)
        self.feedback = FeedbackPublisher(self.kafka_bootstrap, s.stores.feedback_topic, s.stores.topic_partitions,
                                          outbox=self.outbox)
        for customer, override in (await LimitStore(self.redis).all()).items():  # customers' own limits
            app.state.gateway.limits.set_own(customer, override)
        limits = WebhookLimits(s.feedback.max_body_bytes, s.feedback.events_per_s, s.feedback.burst)
        mount_feedback(app, customers, traces, self.feedback, limits)
        port = s.serving.port or free_port(s.serving.host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=s.serving.host, port=port, log_level="warning",
                                                   access_log=False, lifespan="off"))
        self.gateway_url = f"http://{s.serving.host}:{port}"
        self.ingest_task = asyncio.create_task(self.ingest.supervise(), name="ingest")
        keeper = FeedbackOutboxKeeper(self.outbox, self.feedback, self.redis, self.ingest.handled_key,
                              resend_after_s=s.feedback.resend_after_s)
        self.keeper_task = asyncio.create_task(keeper.run(self._stopping), name="outbox-keeper")
        capture_keeper = InteractionOutboxKeeper(self.capture, self.redis,
                                                 resend_after_s=s.serving.capture_resend_after_s)
        self.capture_keeper_task = asyncio.create_task(capture_keeper.run(self._stopping), name="capture-keeper")
        self._write_state()
        if s.trainer.enabled:
            self.trainer = self._start_trainer(model)
            self.trainer_watch = asyncio.create_task(self._keep_trainer_running(), name="trainer-watch")
        if s.evals.interval_s > 0:
            self.evals = EvalJob.connect(self.redis, self.gateway_url, admin_key(s), s.evals,
                                         s.serving.served_base_name)
            self.evals_task = asyncio.create_task(self.evals.run(self._stopping, s.evals.interval_s), name="evals")

    async def _purge(self, customer: str, replay: ReplayBuffer) -> dict:
        """What the stages above serving keep of a customer (the admin API's customer delete)."""
        records = await replay.delete(customer)
        scores = await EvalHistory(self.redis).delete(customer)
        await SuiteStore(self.redis).delete(customer)
        await TrainingHalts(self.redis).resume(customer)
        group = self.settings.feedback.ingest_group
        await self.redis.delete(waiting_key(group, customer), dead_key(group, customer))
        await asyncio.to_thread(shutil.rmtree, self.settings.trainer_dir / customer, True)
        return {"replay_records": records, "eval_scores": scores}

    def _start_trainer(self, model: str) -> ChildProcess:
        """The co-located trainer, in its own process (its compute must not hold the gateway's GIL)."""
        env = {**os.environ, **self.settings.child_env(), "CLORA_GATEWAY_URL": self.gateway_url,
               "CLORA_REDIS_URL": self.redis_url, "CLORA_MODEL": model}
        env.pop("CLORA_ENGINE_LOG", None)  # marks processes vLLM spawns (clora.core.processes); not the trainer
        return ChildProcess("trainer", [sys.executable, "-m", "clora.cli.main", "train"], self.run_dir / "trainer.log",
                            env=env).start()

    async def _keep_trainer_running(self, check_s: float = 2.0) -> None:
        """Restart the trainer when it dies (it resumes from its checkpoints and publishes what it
        had not), backing off while it keeps dying."""
        backoff, started = 1.0, time.monotonic()
        while not self._stopping.is_set():
            await asyncio.sleep(check_s)
            if self.trainer is None or self.trainer.alive() or self._stopping.is_set():
                if time.monotonic() - started > 60:
                    backoff = 1.0  # it has stayed up: the next death is not a crash loop
                continue
            log.error("trainer exited (%s); restarting in %.0f s [log: %s]", self.trainer.last_log_line() or "no output",
                      backoff, self.trainer.log_path)
            await asyncio.sleep(backoff)
            if self._stopping.is_set():
                return
            self.trainer.start()
            backoff, started = min(backoff * 2, 60.0), time.monotonic()

    def _write_state(self) -> None:
        state = {"gateway_url": self.gateway_url, "redis_url": self.redis_url, "model": self.model,
                 "kafka_bootstrap": self.kafka_bootstrap, "run_dir": str(self.run_dir), "pid": os.getpid(),
                 "engine_url": self.engine.url if self.engine else None}
        # Readers poll for this file: write it whole (temp file + rename), never half.
        tmp = self.settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))  # the admin key stays in its own 0600 file
        tmp.rename(self.settings.state_file)

    async def serve(self) -> None:
        assert self.server is not None
        await self.server.serve()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self._stopping.set()
        if self.trainer_watch is not None:
            self.trainer_watch.cancel()
        if self.evals_task is not None:
            await asyncio.wait([self.evals_task], timeout=30)
            self.evals_task.cancel()
        if self.evals is not None:
            await self.evals.close()
        if self.trainer is not None:
            await asyncio.to_thread(self.trainer.stop)
        if self.ingest is not None and self.ingest_task is not None:
            self.ingest.stop()
            await asyncio.wait([self.ingest_task], timeout=30)
        for keeper in (self.keeper_task, self.capture_keeper_task, self.routes_task):
            if keeper is not None:
                await asyncio.wait([keeper], timeout=30)
        if self.engine is not None:
            await self.engine.stop()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.stop)
            if self.capture.outbox is not None:
                await asyncio.to_thread(self.capture.outbox.close)
        if self.feedback is not None:
            await asyncio.to_thread(self.feedback.close)
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
        if self.redis is not None:
            await self.redis.aclose()
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        self.settings.state_file.unlink(missing_ok=True)

