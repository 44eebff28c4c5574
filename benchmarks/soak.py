"""Soak: chat + feedback + training for several customers under faults, counted so that it can fail.

Runs `clora serve` as a child process (its own process group, as a service manager starts it) on
a broker and a valkey the soak starts itself, so that the soak can kill each of them. Each
customer's agent asks a question, then sends feedback on the answer (a rating or an operator
correction, under an event id of its own, sent again on a 503 or a dropped connection as the docs
ask); its trainer config is feedback-only (a step every few records). One fault at a time, every
`--fault-every-s` (and never before the last one's window has closed), each kind once per round
in a seeded order, until `--minutes` have passed and `--min-rounds` rounds are done:

- `engine`: vLLM's engine core SIGKILLed (the supervisor restarts it; chat answers 503 meanwhile);
- `serve`: the whole of `clora serve` SIGKILLed (its process group) and started again on its home;
- `trainer`: the trainer child SIGKILLed (`clora serve` restarts it; it resumes from checkpoints);
- `ingestion`: the ingestion pass cancelled mid-batch (SIGUSR1, the `CLORA_FAULT_HOOKS` hook);
  its supervisor must start it again;
- `broker`: the broker SIGKILLed and restarted empty on its port (Tansu keeps topics in memory:
  the outboxes refill it);
- `redis`: valkey SIGKILLed and restarted on its port and data (its append-only file).

Each fault's window, the 5xx it may cause and the counts from the customers' stored records follow
`clora.bench.soak_tally` (rules fixed before the run). Afterwards the load stops, the soak waits for
every accepted event to be stored, and writes benchmarks/results/soak.json: requests, status codes,
designed and undesigned 5xx, lost and duplicated by records (targets 0 / 0 / 0), the windows, and
the RSS of every process over time.

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
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from clora.bench import soak_tally as tally
from clora.bench.harness import model_path
from clora.bench.soak_tally import CONNECTION, FaultWindow, Observation
from clora.core.customers import CustomerStore
from clora.core.processes import free_port
from clora.core.provenance import command, provenance
from clora.core.services import start_broker, start_redis
from clora.core.settings import Settings
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.wire.admin import CustomerVersions, EventFate
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[1]
Answer = TypeVar("Answer", bound=BaseModel)
PROGRAM = "python benchmarks/soak.py"
QUESTIONS = ["What is a refund window?", "How do I reset my password?", "Which plan includes SSO?",
             "Can I export my data?", "Where do I find invoices?", "How do I add a teammate?"]
FEEDBACK_GIVE_UP_S = 300.0  # a client keeps re-sending one feedback event this long (a serve restart)


def tree(pid: int | None) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid) if pid else None
        return [root, *root.children(recursive=True)] if root else []
    except psutil.Error:
        return []


def matching(procs: list[psutil.Process], needle: str) -> list[psutil.Process]:
    found = []
    for p in procs:
        try:
            if needle in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


class Serve:
    """`clora serve` as a child process in its own process group."""

    def __init__(self, settings: Settings, log: Path):
        self.env = {**os.environ, **settings.child_env()}
        self.log, self.state_file = log, settings.state_file
        self.url = f"http://{settings.serving.host}:{settings.serving.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clora.cli.main", "serve"], env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()

    def engine_cores(self) -> list[psutil.Process]:
        return matching(tree(self.proc.pid), "EngineCore")

    def trainers(self) -> list[psutil.Process]:
        return matching(tree(self.proc.pid), "clora.cli.main train")

    async def health(self) -> dict | None:
        """/healthz of this child (not of a stale one), or None while it does not answer 200."""
        try:
            if json.loads(self.state_file.read_text())["pid"] != self.proc.pid:
                return None
            async with httpx.AsyncClient(timeout=5) as http:
                resp = await http.get(f"{self.url}/healthz")
            return resp.json() if resp.status_code == 200 else None
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            return None


class Soak:
    def __init__(self, args: argparse.Namespace, home: Path):
        self.args, self.home = args, home
        self.rng = random.Random(args.seed)
        self.seen: list[Observation] = []
        self.accepted: dict[str, set[str]] = collections.defaultdict(set)  # customer -> event ids
        self.windows: list[FaultWindow] = []
        self.rss: list[dict] = []
        self.requests = 0
        self.stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.started

    # -- the runtime ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.broker_port = free_port()
        self.broker = start_broker(self.home / "broker-0", port=self.broker_port)
        self.redis_port = free_port()
        self.valkey = start_redis(self.home / "valkey", self.home / "valkey-log-0", port=self.redis_port)
        base = Settings()
        self.settings = base.updated(**{
            "home": self.home / "serve", "model": model_path(self.args.model, base.cache_dir), "port": free_port(),
            "kafka_bootstrap": self.broker.url, "redis_url": self.valkey.url, "eval_interval_s": 0.0,
            "feedback_resend_after_s": 10.0, "capture_resend_after_s": 10.0, "trainer_metrics_port": 0,
            "fault_hooks": True})
        self.settings.home.mkdir(parents=True)
        self.serve = Serve(self.settings, self.home / "serve.out")
        self.serve.start()
        if await self.healthy_within(lambda h: h is not None, 600) is None:
            raise RuntimeError(f"clora serve did not become healthy; see {self.serve.log}")
        self.redis = aioredis.Redis.from_url(self.valkey.url)
        self.config = TenantConfig(lr=1e-3, rank=8, alpha=16, min_records=4, records_per_step=8)  # every customer's
        room = int(self.args.minutes * 60 / self.args.interval_s * 4) + 1000  # no eviction: every record stays
        self.keys = {}
        for i in range(self.args.customers):
            name = f"soak-{i}"
            self.keys[name] = await CustomerStore(self.redis).create(name)
            await TenantConfigStore(self.redis).set(name, self.config)
            await ReplayBuffer(self.redis).set_quota(name, room)

    async def healthy_within(self, ok: Callable[[dict | None], bool], timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ok(await self.serve.health()):
                return time.monotonic()
            await asyncio.sleep(0.5)
        return None

    async def close(self) -> None:
        """Whatever was started, stopped (also after a failed start or run)."""
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()
        if getattr(self, "serve", None) is not None:
            self.serve.stop()
        for service in (getattr(self, "broker", None), getattr(self, "valkey", None)):
            if service is not None:
                service.stop()

    # -- load -------------------------------------------------------------------------------------
    async def send(self, http: httpx.AsyncClient, what: str, path: str, **kw) -> httpx.Response | None:
        sent = self.now()
        try:
            resp = await http.post(path, **kw)
        except httpx.HTTPError:  # refused, dropped or hung: no HTTP answer
            self.seen.append(Observation(what, sent, self.now(), None, CONNECTION, False))
            return None
        code = None
        if resp.status_code >= 400:
            try:
                code = resp.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "no_error_body"
        self.seen.append(Observation(what, sent, self.now(), resp.status_code, code, "retry-after" in resp.headers))
        return resp

    async def customer(self, http: httpx.AsyncClient, name: str) -> None:
        headers = {"Authorization": f"Bearer {self.keys[name]}"}
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.expovariate(1 / self.args.interval_s))
            self.requests += 1
            chat = await self.send(http, "chat", "/v1/chat/completions", headers=headers, json={
                "model": "default", "max_tokens": 16,
                "messages": [{"role": "user", "content": self.rng.choice(QUESTIONS)}]})
            if chat is None or chat.status_code != 200:
                await asyncio.sleep(1)
                continue
            trace = chat.headers["x-clora-trace-id"]
            event = ({"trace_id": trace, "rating": self.rng.choice(["up", "down"])} if self.rng.random() < 0.7 else
                     {"trace_id": trace, "source": "operator",
                      "correction": {"role": "assistant", "content": "Thanks for asking! Here is how."}})
            await self.feedback(http, name, headers, {**event, "event_id": uuid.uuid4().hex})

    async def feedback(self, http: httpx.AsyncClient, name: str, headers: dict, event: dict) -> None:
        """Sent until accepted: again after a 503 (its Retry-After, at most 5 s) or no answer (2 s)."""
        give_up = time.monotonic() + FEEDBACK_GIVE_UP_S
        while time.monotonic() < give_up:
            sent = await self.send(http, "feedback", "/v1/feedback", headers=headers, json=event)
            if sent is not None and sent.status_code == 202:
                self.accepted[name].update(sent.json()["event_ids"])
                return
            if sent is not None and sent.status_code != 503:
                return  # refused for good (counted by its status)
            retry = float(sent.headers.get("retry-after", 2)) if sent is not None else 2.0
            await asyncio.sleep(min(retry, 5.0))

    # -- faults -----------------------------------------------------------------------------------
    async def inject(self, kind: str) -> FaultWindow:
        """Inject one fault; the window, once its component is healthy again (or its maximum passed)."""
        injected, cap = self.now(), tally.MAX_WINDOW_S[kind]
        print(f"{injected:6.0f} s: fault {kind}", flush=True)
        if kind == "engine":
            killed = {p.pid for p in self.serve.engine_cores()}
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            healed = await self.healthy_within(
                lambda h: bool(h and h["engine"]) and bool({p.pid for p in self.serve.engine_cores()} - killed), cap)
        elif kind == "serve":
            self.serve.kill()
            self.serve.start()
            healed = await self.healthy_within(lambda h: h is not None, cap)
        elif kind == "trainer":
            killed = {p.pid for p in self.serve.trainers()}
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            healed = await self.healthy_within(lambda _: bool({p.pid for p in self.serve.trainers()} - killed), cap)
        elif kind == "ingestion":
            before = (await self.serve.health() or {}).get("ingestion", {}).get("detail", {}).get("restarts", 0)
            self.serve.proc.send_signal(signal.SIGUSR1)
            healed = await self.healthy_within(lambda h: self.ingesting(h, more_restarts_than=before), cap)
        elif kind == "broker":
            self.broker.process.proc.send_signal(signal.SIGKILL)
            self.broker.process.proc.wait()
            await asyncio.sleep(2)
            n = sum(w.kind == "broker" for w in self.windows) + 1
            # Started from this thread, not a worker's: a child is sent SIGTERM when its spawning thread ends.
            self.broker = start_broker(self.home / f"broker-{n}", port=self.broker_port)
            healed = time.monotonic()  # start_broker returns once it accepts connections
        elif kind == "redis":
            self.valkey.process.proc.send_signal(signal.SIGKILL)
            self.valkey.process.proc.wait()
            n = sum(w.kind == "redis" for w in self.windows) + 1
            self.valkey = start_redis(self.home / "valkey", self.home / f"valkey-log-{n}",
                                      port=self.redis_port)  # returns once it answers PING (its AOF replayed)
            healed = await self.healthy_within(lambda h: self.ingesting(h), cap)
        else:
            raise ValueError(kind)
        return FaultWindow(kind=kind, injected_s=injected,
                           healthy_s=None if healed is None else healed - self.started)

    @staticmethod
    def ingesting(health: dict | None, more_restarts_than: int = -1) -> bool:
        ingestion = (health or {}).get("ingestion", {})
        return ingestion.get("state") == "running" and ingestion["detail"]["restarts"] > more_restarts_than

    async def faulting(self) -> None:
        """One fault at a time, each kind once per round (seeded order), until the load's time is up
        and `min_rounds` whole rounds are done."""
        rounds, kinds, last = 0, [], 0.0
        while True:
            next_at = max(last + self.args.fault_every_s, self.now())
            if rounds >= self.args.min_rounds and next_at >= self.args.minutes * 60:
                await asyncio.sleep(max(0.0, self.args.minutes * 60 - self.now()))
                return
            kinds = kinds or self.rng.sample(tally.FAULTS, len(tally.FAULTS))
            await asyncio.sleep(next_at - self.now())
            last = self.now()
            window = await self.inject(kinds.pop())
            self.windows.append(window)
            rounds += not kinds
            await asyncio.sleep(max(0.0, window.end_s - self.now()))  # never two faults at once

    async def sampling_rss(self) -> None:
        while not self.stop.is_set():
            self.sample_rss()
            try:
                await asyncio.wait_for(self.stop.wait(), 15)
            except asyncio.TimeoutError:
                pass

    def sample_rss(self) -> None:
        engine = [p for core in self.serve.engine_cores() for p in tree(core.pid)]
        trainer = [p for t in self.serve.trainers() for p in tree(t.pid)]
        kinds = {"serve": tree(self.serve.proc.pid)[:1], "engine": engine, "trainer": trainer,
                 "broker": tree(self.broker.process.pid), "redis": tree(self.valkey.process.pid)}
        sample: dict = {"at_s": round(self.now(), 1)}
        for kind, procs in kinds.items():
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            sample[kind] = round(total / 2**20)
        self.rss.append(sample)

    # -- counting ---------------------------------------------------------------------------------
    async def stored(self) -> tuple[list, int]:
        """Every record the customers' buffers and quarantines hold, and how many were evicted."""
        replay, records, evicted = ReplayBuffer(self.redis), [], 0
        for name in self.keys:
            keys = replay._keys(name)
            records += [tally.stored_record(name, raw) for raw in (await self.redis.hgetall(keys["records"])).values()]
            for raw in (await self.redis.hgetall(keys["quarantine"])).values():
                records.append(tally.stored_record(name, json.dumps(json.loads(raw)["record"]).encode()))
            evicted += (await replay.stats(name)).evicted
        return records, evicted

    async def admin(self, path: str, answer: type[Answer]) -> Answer | dict:
        """An admin API answer, or what went wrong (the result is written whatever the end looks like)."""
        key = (self.settings.home / "admin_key").read_text().strip()
        try:
            async with httpx.AsyncClient(base_url=self.serve.url, timeout=30,
                                         headers={"Authorization": f"Bearer {key}"}) as http:
                resp = await http.get(path)
                resp.raise_for_status()
                return answer.model_validate_json(resp.content)
        except (httpx.HTTPError, ValidationError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def run(self, before_counting: Callable[["Soak"], Awaitable[None]] | None = None) -> dict:
        """The soak; `before_counting` (tests) may plant what the counts must catch."""
        started_at, ran_as = datetime.now(timezone.utc), command(PROGRAM)  # before anything exports CLORA_ vars
        try:
            await self.start()
            return await self.loaded(before_counting, provenance(PROGRAM, self.settings, self.config,
                                                                started_at=started_at, command_line=ran_as))
        finally:
            await self.close()

    async def loaded(self, before_counting: Callable[["Soak"], Awaitable[None]] | None, recorded: dict) -> dict:
        self.started = time.monotonic()
        sampler = asyncio.create_task(self.sampling_rss())
        async with httpx.AsyncClient(base_url=self.serve.url, timeout=120) as http:
            load = [asyncio.create_task(self.customer(http, name)) for name in self.keys]
            await self.faulting()
            self.stop.set()
            await asyncio.gather(*load)
        loaded_s = self.now()
        deadline = time.monotonic() + self.args.drain_s
        while (counts := tally.record_counts(self.accepted, *await self.stored()))["lost_by_records"] and \
                time.monotonic() < deadline:
            await asyncio.sleep(2)
        drained_s = self.now()
        await sampler
        self.sample_rss()
        if before_counting is not None:
            await before_counting(self)
        records, evicted = await self.stored()
        counts = tally.record_counts(self.accepted, records, evicted)
        missing = tally.lost_ids(self.accepted, records)
        fates = {c: [jsonable(await self.admin(f"/admin/customers/{c}/feedback/{i}", EventFate)) for i in ids[:5]]
                 for c, ids in missing.items()}  # what became of a few of the lost ones
        health = await self.serve.health()
        listed = {name: await self.admin(f"/admin/customers/{name}/adapters", CustomerVersions) for name in self.keys}
        versions = {name: len(v.versions) if isinstance(v, CustomerVersions) else v for name, v in listed.items()}
        codes = collections.Counter(f"{s.what} {s.status or CONNECTION}" for s in self.seen)
        kinds = sorted({k for s in self.rss for k in s if k != "at_s"})
        return {
            "benchmark": "soak", "model": Path(self.settings.serving.model).name,
            **recorded,
            "minutes": round(loaded_s / 60, 2), "customers": self.args.customers, "requests": self.requests,
            "faults": dict(collections.Counter(w.kind for w in self.windows)),
            "windows": [w.record() for w in self.windows], "max_window_s": tally.MAX_WINDOW_S,
            "window_margin_s": tally.WINDOW_MARGIN_S, "unrecovered_faults": sum(not w.recovered for w in self.windows),
            "status_codes": dict(codes), **tally.failures(self.seen, self.windows), **counts,
            "lost_fates": fates, "ingestion_at_end": (health or {}).get("ingestion"),
            "versions_kept": versions, "drain_s": round(drained_s - loaded_s, 1),
            "rss_mb_start": {k: self.rss[0].get(k) for k in kinds},
            "rss_mb_end": {k: self.rss[-1].get(k) for k in kinds},
            "rss_mb": self.rss,
        }


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--minutes", type=float, default=10.0)
    cli.add_argument("--min-rounds", type=int, default=1, help="rounds of every fault kind, whatever the minutes")
    cli.add_argument("--customers", type=int, default=4)
    cli.add_argument("--interval-s", type=float, default=1.0, help="mean seconds between one customer's requests")
    cli.add_argument("--fault-every-s", type=float, default=60.0)
    cli.add_argument("--drain-s", type=float, default=300.0, help="how long to wait for ingestion afterwards")
    cli.add_argument("--model", default="tiny", help="`tiny` (a random 2-layer Llama) or a model directory")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    return cli


if __name__ == "__main__":
    cli = parser().parse_args()
    home = Path(tempfile.mkdtemp(prefix="clora-soak-"))
    result = asyncio.run(Soak(cli, home).run())
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_mb", "windows")}, indent=2))
    print(f"wrote {cli.out}")


def jsonable(answer: BaseModel | dict) -> dict:
    return answer.model_dump(mode="json") if isinstance(answer, BaseModel) else answer
