"""`clora demo`: customers with hidden preferences, visibly learning, on embedded defaults.

Everything runs as in production: `clora serve`'s stack (embedded Kafka and Redis, vLLM with the
default model, the gateway, ingestion, the trainer as a child process), simulated customers
sending live traffic through the OpenAI-compatible endpoint, a simulated operator sending ratings
and corrections through the feedback webhook, and the eval job's promotion gate deciding which
trained version each customer is served. Rounds go on until every customer has gained the target
on its held-out eval, or the time budget is spent; then a report (table, JSON, PNG).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from clora.agents.preference import DEMO_RULES
from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.models import resolve_model
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.demo.report import CustomerReport, DemoReport, machine, write
from clora.demo.simulation import SimulatedCustomer, SimulatedOperator
from clora.evals.gate import Decision
from clora.evals.job import EvalJob
from clora.evals.scoring import EvalScore, admin_chat_client
from clora.evals.suites import EvalSuite, SuiteStore
from clora.stack import Stack
from clora.wire.trainer_config import TenantConfig


@dataclass
class DemoOptions:
    minutes: float = 14.0  # whole run, start-up included
    max_rounds: int | None = None  # stop after this many rounds even if time is left
    requests_per_round: int = 8  # per customer
    eval_prompts: int = 16
    max_tokens: int = 64
    target_gain: float = 0.4
    lr: float = 2e-3
    out_dir: Path | None = None  # None: <CLORA_HOME>/demo/<start time>/


@dataclass
class Tenant:
    sim: SimulatedCustomer
    suite: EvalSuite
    before: EvalScore | None = None
    served: str | None = None
    score: float | None = None
    published: int = 0
    requests: int = 0
    feedback: int = 0
    live: list[tuple[float, float]] = field(default_factory=list)
    evals: list[tuple[float, float]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def gain(self) -> float:
        return (self.score or 0.0) - (self.before.score if self.before else 0.0)


class Demo:
    def __init__(self, settings: Settings, options: DemoOptions, console: Console):
        self.settings, self.options, self.console = settings, options, console
        self.started = time.monotonic()
        self.tenants: dict[str, Tenant] = {}
        self.phase = "starting"
        self.round = 0

    def minutes(self) -> float:
        return (time.monotonic() - self.started) / 60

    # -- set-up ----------------------------------------------------------------------------------------
    async def enroll(self, stack: Stack) -> SimulatedOperator:
        """Customers with keys, gated trainer configs, eval suites; an operator for all of them."""
        redis = stack.redis
        store, suites = CustomerStore(redis), SuiteStore(redis)
        admin = RuntimeClient(stack.gateway_url, admin_key(self.settings))
        for name, rule_spec in DEMO_RULES.items():
            key = await store.create(name)
            config = TenantConfig(gated=True, lr=self.options.lr, records_per_step=8, min_records=4)
            await admin.set_trainer_config(name, config.model_dump())
            suite = EvalSuite(environment=f"preference:{rule_spec}", n=self.options.eval_prompts,
                              max_tokens=self.options.max_tokens)
            await suites.set(name, suite)
            self.tenants[name] = Tenant(SimulatedCustomer(name, rule_spec, key, stack.gateway_url, seed=len(self.tenants)),
                                        suite)
        await admin.close()
        # The operator's reference answers: the base model's greedy answer to the question (uncaptured).
        self.reference_client = admin_chat_client(stack.gateway_url, admin_key(self.settings), next(iter(DEMO_RULES)))

        async def reference(messages) -> str:
            reply = await self.reference_client.chat.completions.create(
                model=self.settings.served_base_name, messages=messages, max_tokens=self.options.max_tokens,
                temperature=0.0)
            return reply.choices[0].message.content or ""

        return SimulatedOperator(stack.gateway_url, await store.create_operator("demo-operator", list(DEMO_RULES)),
                                 reference)

    # -- one round -------------------------------------------------------------------------------------
    async def traffic(self, operator: SimulatedOperator) -> None:
        """Every customer's agent asks a batch of questions; the operator reviews every answer."""
        batches = await asyncio.gather(*[t.sim.ask(self.options.requests_per_round, self.options.max_tokens)
                                         for t in self.tenants.values()])
        for tenant, exchanges in zip(self.tenants.values(), batches):
            events = list(await asyncio.gather(*[operator.review(e, tenant.sim.rule) for e in exchanges]))
            await operator.send(events)
            tenant.requests += len(exchanges)
            tenant.feedback += len(events)
            followed = sum(e.rating == "up" for e in events) / len(events)
            tenant.live.append((self.minutes(), followed))

    async def trained(self, job: EvalJob, timeout_s: float = 240.0) -> None:
        """Until every customer has a version newer than before the round (the trainer has learnt
        from the round's feedback), or the timeout."""
        before = {name: t.published for name, t in self.tenants.items()}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in self.tenants:
                listed = await job.admin.versions(name)
                self.tenants[name].published = max((v["version"] for v in listed["versions"]), default=0)
            if all(t.published > before[name] for name, t in self.tenants.items()):
                return
            await asyncio.sleep(1.0)

    async def gate(self, job: EvalJob) -> None:
        """Every customer's candidate at once: one engine batch of all their eval prompts."""
        decisions = await asyncio.gather(*[job.evaluate(name) for name in self.tenants])
        for (name, tenant), decision in zip(self.tenants.items(), decisions):
            if decision is not None:
                tenant.decisions.append(decision)
            await self.refresh(job, name)

    async def refresh(self, job: EvalJob, name: str) -> None:
        tenant = self.tenants[name]
        listed = await job.admin.versions(name)
        tenant.published = max((v["version"] for v in listed["versions"]), default=0)
        served_score = (await job.score(name, tenant.suite, listed["current"])).score
        if tenant.served != listed["current"] or not tenant.evals:
            tenant.evals.append((self.minutes(), served_score))
        tenant.served, tenant.score = listed["current"], served_score

    def done(self) -> bool:
        return all(t.gain() >= self.options.target_gain + 0.1 for t in self.tenants.values())

    # -- display ---------------------------------------------------------------------------------------
    def view(self) -> Group:
        table = Table("customer", "hidden rule", "requests", "feedback", "live reward", "trained", "served",
                      "eval before", "eval now", "last gate decision", title="clora demo")
        for name, t in self.tenants.items():
            last = t.decisions[-1] if t.decisions else None
            table.add_row(name, t.sim.rule.description, str(t.requests), str(t.feedback),
                          f"{t.live[-1][1]:.2f}" if t.live else "-", f"v{t.published}" if t.published else "-",
                          t.served or "base", f"{t.before.score:.2f}" if t.before else "-",
                          f"{t.score:.2f}" if t.score is not None else "-",
                          f"{last.action} {last.candidate}" if last else "-")
        status = Text(f"{self.phase} | round {self.round} | {self.minutes():.1f} / {self.options.minutes:.0f} min")
        return Group(table, status)

    # -- the run ---------------------------------------------------------------------------------------
    async def run(self) -> DemoReport:
        stack = Stack(self.settings)
        with Live(self.view(), console=self.console, refresh_per_second=2, transient=False) as live:
            async def tick() -> None:
                while True:
                    live.update(self.view())
                    await asyncio.sleep(0.5)

            ticker = asyncio.create_task(tick())
            serving: asyncio.Task | None = None
            try:
                self.phase = "starting the stack (Kafka, Redis, vLLM, gateway, trainer)"
                await stack.start()
                serving = asyncio.create_task(stack.serve())
                while not stack.server.started:
                    if serving.done():
                        raise RuntimeError("the gateway did not start (see the run's logs)")
                    await asyncio.sleep(0.05)
                return await self._learn(stack)
            finally:
                ticker.cancel()
                self.phase = "stopping"
                live.update(self.view())
                await stack.stop()
                if serving is not None:
                    await asyncio.wait([serving], timeout=10)

    async def _learn(self, stack: Stack) -> DemoReport:
        operator = await self.enroll(stack)
        job = EvalJob.connect(stack.redis, stack.gateway_url, admin_key(self.settings), self.settings)
        try:
            self.phase = "scoring the base model on every customer's held-out suite"
            for name, tenant in self.tenants.items():
                tenant.before = await job.score(name, tenant.suite, None)
                await self.refresh(job, name)
            deadline = self.options.minutes - 1.5  # leaves time for the final report
            while self.minutes() < deadline and not self.done() and self.round != self.options.max_rounds:
                self.round += 1
                self.phase = "live traffic and operator feedback"
                await self.traffic(operator)
                self.phase = "training on the round's feedback"
                await self.trained(job)
                self.phase = "promotion gate: scoring candidates"
                await self.gate(job)
            self.phase = "final report"
            return await self.report(job, stack)
        finally:
            await job.close()
            await operator.close()
            await self.reference_client.close()
            for t in self.tenants.values():
                await t.sim.close()

    async def report(self, job: EvalJob, stack: Stack) -> DemoReport:
        rules = {name: t.sim.rule for name, t in self.tenants.items()}
        customers = []
        for name, t in self.tenants.items():
            final = await job.score(name, t.suite, t.served)
            foreign = [r for other, r in rules.items() if other != name]

            def leak(score: EvalScore) -> float:
                return sum(any(r.check(a) for r in foreign) for a in score.answers) / max(1, len(score.answers))

            customers.append(CustomerReport(
                customer=name, rule=t.sim.rule.name, eval_before=t.before.score, eval_after=final.score,
                foreign_rule_rate=leak(final), foreign_rule_rate_before=leak(t.before), served_version=t.served,
                versions_published=t.published, promoted=sum(d.action == "promoted" for d in t.decisions),
                held_back=sum(d.action == "held-back" for d in t.decisions), requests=t.requests,
                feedback_events=t.feedback, live=t.live, evals=t.evals + [(self.minutes(), final.score)]))
        passed = all(c.eval_after - c.eval_before >= self.options.target_gain and c.foreign_rule_rate == 0
                     for c in customers)
        return DemoReport(minutes=round(self.minutes(), 2), machine=machine(), command=" ".join(["clora", *sys.argv[1:]]),
                          model=str(stack.model), target_gain=self.options.target_gain, passed=passed,
                          customers=customers, decisions=[d for t in self.tenants.values() for d in t.decisions])


def demo_settings(base: Settings) -> Settings:
    """A fresh home per run (its own Redis data, adapters, trainer state), sharing the model cache."""
    model = str(resolve_model(base.model, base.cache_dir))
    home = base.home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    # On a small machine serving and training must take turns (two compute-bound processes on the
    # same cores slow each other down many times over): the trainer waits while any request runs.
    return base.model_copy(update={"home": home, "model": model, "port": 0, "eval_interval_s": 0.0,
                                   "trainer_enabled": True, "trainer_idle_s": 1.0, "trainer_max_inflight": 0})


def print_report(report: DemoReport, console: Console, paths: tuple[Path, Path]) -> None:
    table = Table("customer", "rule", "eval before", "eval after", "gain", "foreign rule rate", "served",
                  "promoted", "held back", title=f"clora demo: {report.minutes:.1f} minutes")
    for c in report.customers:
        table.add_row(c.customer, c.rule, f"{c.eval_before:.2f}", f"{c.eval_after:.2f}",
                      f"{c.eval_after - c.eval_before:+.2f}", f"{c.foreign_rule_rate:.2f}", c.served_version or "base",
                      str(c.promoted), str(c.held_back))
    console.print(table)
    verdict = "[bold green]passed[/]" if report.passed else "[bold red]not passed[/]"
    console.print(f"{verdict}: every customer +{report.target_gain} on its held-out eval, no rule adopted from "
                  f"another customer. Report: {paths[0]}  Plot: {paths[1]}")


def default_out_dir(settings: Settings) -> Path:
    """A fresh folder per run under the data dir: running the main job never writes into the checkout."""
    return settings.home / "demo" / time.strftime("%Y%m%d-%H%M%S")


async def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoReport:
    out_dir = options.out_dir or default_out_dir(settings)
    report = await Demo(demo_settings(settings), options, console).run()
    print_report(report, console, write(report, out_dir))
    return report
