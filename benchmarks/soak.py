"""Soak: chat + feedback + training for several customers with random faults, and what was lost.

Starts `clora serve`'s stack in this process (its co-located trainer as a child, as `clora serve`
runs it) on its own embedded broker and Redis, so that the soak can kill them. Each customer's
agent asks a question, then sends feedback on the answer (a rating or an operator correction);
its trainer config is feedback-only (a step every few records). Every `--fault-every-s` one fault,
drawn at random:

- `engine`: vLLM's engine core SIGKILLed (the supervisor restarts it; chat answers 503 meanwhile);
- `ingestion`: the ingestion consumer crashes (one injected exception: supervised, it restarts);
- `trainer`: the trainer child SIGKILLed (`clora serve` restarts it; it resumes from checkpoints);
- `broker`: the broker SIGKILLed and restarted empty on its port (Tansu keeps topics in memory:
  the outboxes refill it).

Afterwards the load stops and the soak waits for ingestion to drain, then counts: requests, status
codes, the designed 503s (a 503 with `Retry-After`), other 5xx (must be 0), feedback accepted (202)
and how many of those event ids reached a replay buffer (evicted later or not), lost and
duplicated (both must be 0), and the RSS of every process over time. Writes
benchmarks/results/soak.json.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--customers 4] [--model tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from clora.bench.harness import model_path
from clora.core.customers import CustomerStore
from clora.core.processes import free_port
from clora.core.provenance import command, provenance
from clora.core.services import start_broker, start_redis
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.stack import Stack
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[1]
PROGRAM = "python benchmarks/soak.py"
FAULTS = ("engine", "ingestion", "trainer", "broker")
QUESTIONS = ["What is a refund window?", "How do I reset my password?", "Which plan includes SSO?",
             "Can I export my data?", "Where do I find invoices?", "How do I add a teammate?"]


class Soak:
    def __init__(self, args: argparse.Namespace, home: Path):
        self.args, self.home = args, home
        self.rng = random.Random(args.seed)
        self.codes: collections.Counter[str] = collections.Counter()
        self.designed_503 = 0
        self.errors_5xx: collections.Counter[str] = collections.Counter()
        self.accepted: dict[str, list[str]] = collections.defaultdict(list)  # customer -> event ids
        self.faults: collections.Counter[str] = collections.Counter()
        self.fault_log: list[dict] = []
        self.rss: list[dict] = []
        self.requests = 0
        self.stop = asyncio.Event()

    # -- the runtime ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.broker_port = free_port()
        self.broker = start_broker(self.home / "broker-0", port=self.broker_port)
        self.redis_service = start_redis(self.home / "redis", self.home / "redis-log")
        base = Settings()
        self.settings = settings = base.model_copy(update={
            "home": self.home, "model": model_path(self.args.model, base.cache_dir), "port": 0,
            "kafka_bootstrap": self.broker.url, "redis_url": self.redis_service.url, "eval_interval_s": 0.0,
            "feedback_resend_after_s": 10.0, "capture_resend_after_s": 10.0, "trainer_enabled": True})
        self.stack = Stack(settings)
        await self.stack.start()
        self.serving = asyncio.create_task(self.stack.serve())
        while not self.stack.server.started:
            await asyncio.sleep(0.05)
        self.keys = {}
        self.config = TenantConfig(lr=1e-3, rank=8, alpha=16, min_records=4, records_per_step=8)  # every customer's
        for i in range(self.args.customers):
            name = f"soak-{i}"
            self.keys[name] = await CustomerStore(self.stack.redis).create(name)
            await TenantConfigStore(self.stack.redis).set(name, self.config)

    async def close(self) -> None:
        await self.stack.stop()
        await asyncio.wait([self.serving], timeout=10)
        self.broker.stop()
        self.redis_service.stop()

    # -- load -------------------------------------------------------------------------------------
    def count(self, what: str, resp: httpx.Response) -> None:
        self.codes[f"{what} {resp.status_code}"] += 1
        if resp.status_code == 503 and "retry-after" in resp.headers:
            self.designed_503 += 1
        elif resp.status_code >= 500:
            self.errors_5xx[f"{what} {resp.status_code}: {resp.text[:120]}"] += 1

    async def customer(self, http: httpx.AsyncClient, name: str) -> None:
        headers = {"Authorization": f"Bearer {self.keys[name]}"}
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.expovariate(1 / self.args.interval_s))
            try:
                chat = await http.post("/v1/chat/completions", headers=headers, json={
                    "model": "default", "max_tokens": 16,
                    "messages": [{"role": "user", "content": self.rng.choice(QUESTIONS)}]})
            except httpx.HTTPError as exc:  # a hang or a dropped connection is an error, not a 503
                self.errors_5xx[f"chat {type(exc).__name__}"] += 1
                continue
            self.requests += 1
            self.count("chat", chat)
            if chat.status_code != 200:
                continue
            trace = chat.headers["x-clora-trace-id"]
            event = ({"trace_id": trace, "rating": self.rng.choice(["up", "down"])} if self.rng.random() < 0.7 else
                     {"trace_id": trace, "source": "operator",
                      "correction": {"role": "assistant", "content": "Thanks for asking! Here is how."}})
            try:
                sent = await http.post("/v1/feedback", headers=headers, json=event)
            except httpx.HTTPError as exc:
                self.errors_5xx[f"feedback {type(exc).__name__}"] += 1
                continue
            self.count("feedback", sent)
            if sent.status_code == 202:
                self.accepted[name] += sent.json()["event_ids"]

    # -- faults -----------------------------------------------------------------------------------
    def processes(self) -> dict[str, list[psutil.Process]]:
        """This soak's processes by kind, found from their pids (never by name: a test process may
        run another stack's vLLM beside this one)."""
        def tree(pid: int | None) -> list[psutil.Process]:
            try:
                root = psutil.Process(pid) if pid else None
                return [root, *root.children(recursive=True)] if root else []
            except psutil.Error:
                return []
        engine = [p for pid in self.stack.engine.engine_core_pids() for p in tree(pid)]
        return {"serve": [psutil.Process()], "engine": engine, "trainer": tree(self.stack.trainer.pid),
                "broker": tree(self.broker.process.pid), "redis": tree(self.redis_service.process.pid)}

    async def inject(self, kind: str) -> None:
        if kind == "engine":
            for pid in self.stack.engine.engine_core_pids():
                os.kill(pid, signal.SIGKILL)
        elif kind == "trainer":
            if self.stack.trainer.pid is None or not self.stack.trainer.alive():
                return  # still being restarted from the last kill: no fault this time
            os.kill(self.stack.trainer.pid, signal.SIGKILL)
        elif kind == "ingestion":
            ingest = self.stack.ingest
            original = ingest._store_interactions

            async def crash(*a, **kw):
                ingest._store_interactions = original  # once
                raise RuntimeError("soak: injected ingestion crash")
            ingest._store_interactions = crash
        elif kind == "broker":
            self.broker.process.proc.send_signal(signal.SIGKILL)
            self.broker.process.proc.wait()
            await asyncio.sleep(2)
            self.broker = start_broker(self.home / f"broker-{self.faults['broker'] + 1}", port=self.broker_port)
        self.faults[kind] += 1
        self.fault_log.append({"at_s": round(time.monotonic() - self.started, 1), "kind": kind})
        print(f"{time.monotonic() - self.started:6.0f} s: fault {kind}", flush=True)

    async def faulting(self) -> None:
        kinds = list(FAULTS)
        while True:
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.fault_every_s)
                return
            except asyncio.TimeoutError:
                pass
            if not kinds:
                kinds = list(FAULTS)
            await self.inject(kinds.pop(self.rng.randrange(len(kinds))))  # every kind in each round of four

    async def sampling_rss(self) -> None:
        while not self.stop.is_set():
            sample: dict = {"at_s": round(time.monotonic() - self.started, 1)}
            for kind, procs in self.processes().items():
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                sample[kind] = round(total / 2**20)
            self.rss.append(sample)
            try:
                await asyncio.wait_for(self.stop.wait(), 15)
            except asyncio.TimeoutError:
                pass

    # -- the run ----------------------------------------------------------------------------------
    async def in_buffers(self) -> tuple[int, int]:
        """(accepted event ids applied to a buffer, records pushed) over the customers."""
        replay, found, pushed = ReplayBuffer(self.stack.redis), 0, 0
        for name, ids in self.accepted.items():
            seen = replay._keys(name)["seen"]
            for start in range(0, len(ids), 1000):
                scores = await self.stack.redis.zmscore(seen, ids[start:start + 1000])
                found += sum(s is not None for s in scores)
            pushed += (await replay.stats(name)).pushed
        return found, pushed

    async def versions(self) -> dict[str, int]:
        """Adapter versions registered per customer at the end (the trainer published them; the
        registry keeps the newest `CLORA_ADAPTER_KEEP_VERSIONS`)."""
        headers = {"Authorization": f"Bearer {admin_key(self.stack.settings)}"}
        async with httpx.AsyncClient(base_url=self.stack.gateway_url, headers=headers, timeout=30) as http:
            return {name: len((await http.get(f"/admin/customers/{name}/adapters")).json()["versions"])
                    for name in self.keys}

    async def run(self) -> dict:
        # The command before the stack's in-process engine exports CLORA_ variables of its own.
        started_at, ran_as = datetime.now(timezone.utc), command(PROGRAM)
        await self.start()
        self.started = time.monotonic()
        sampler = asyncio.create_task(self.sampling_rss())
        async with httpx.AsyncClient(base_url=self.stack.gateway_url, timeout=120) as http:
            load = [asyncio.create_task(self.customer(http, name)) for name in self.keys]
            faults = asyncio.create_task(self.faulting())
            await asyncio.sleep(self.args.minutes * 60)
            self.stop.set()
            await asyncio.gather(*load, faults)
        loaded_s = time.monotonic() - self.started
        accepted = sum(len(ids) for ids in self.accepted.values())
        deadline = time.monotonic() + self.args.drain_s
        while (found := (await self.in_buffers())[0]) < accepted and time.monotonic() < deadline:
            await asyncio.sleep(2)
        found, pushed = await self.in_buffers()
        trained = await self.versions()
        await sampler
        self.rss.append({"at_s": round(time.monotonic() - self.started, 1),
                         **{k: round(sum(p.memory_info().rss for p in v) / 2**20) for k, v in self.processes().items()}})
        await self.close()
        kinds = sorted({k for s in self.rss for k in s if k != "at_s"})
        return {
            "benchmark": "soak", "model": Path(model_path(self.args.model, Settings().cache_dir)).name,
            **provenance(PROGRAM, self.settings, self.config, started_at=started_at), "command": ran_as,
            "at": time.time(),
            "minutes": round(loaded_s / 60, 2), "customers": self.args.customers, "requests": self.requests,
            "faults": dict(self.faults), "fault_log": self.fault_log, "status_codes": dict(self.codes),
            "designed_503s": self.designed_503, "errors_5xx": sum(self.errors_5xx.values()),
            "errors_5xx_detail": dict(self.errors_5xx), "feedback_accepted": accepted,
            "feedback_in_buffers": found, "versions_kept": trained, "feedback_lost": accepted - found, "feedback_duplicated": pushed - found,
            "drain_s": round(time.monotonic() - self.started - loaded_s, 1),
            "rss_mb_start": {k: self.rss[0].get(k) for k in kinds}, "rss_mb_end": {k: self.rss[-1].get(k) for k in kinds},
            "rss_mb": self.rss,
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--customers", type=int, default=4)
    parser.add_argument("--interval-s", type=float, default=1.0, help="mean seconds between one customer's requests")
    parser.add_argument("--fault-every-s", type=float, default=60.0)
    parser.add_argument("--drain-s", type=float, default=300.0, help="how long to wait for ingestion afterwards")
    parser.add_argument("--model", default="tiny", help="`tiny` (a random 2-layer Llama) or a model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    cli = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="clora-soak-"))
    result = asyncio.run(Soak(cli, home).run())
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mb", "fault_log")}, indent=2))
    print(f"wrote {cli.out}")
