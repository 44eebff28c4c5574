"""`clora demo`: customers with hidden preferences, visibly learning, on embedded defaults.

Everything runs as in production: `clora serve`'s stack (embedded Kafka and Redis, vLLM with the
default model, the gateway, ingestion, the trainer as a child process), simulated customers
sending live traffic through the OpenAI-compatible endpoint, a simulated operator sending ratings
and corrections (for one customer, rubric scores only) through the feedback webhook, and the eval
job's promotion gate deciding which trained version each customer is served. Rounds go on until
every customer's gate-set score has gained the target, or the time budget is spent; then a report
(table, JSON, PNG) whose scores come from a report set: questions on subjects disjoint from
training and from the gate set, so the reported gains are not measured on the set that selected them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from clora.agents.envs import Completion
from clora.agents.preference import DEMO_RULES, SCORED_ONLY
from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.provenance import command, provenance
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.demo.options import Budget, DemoOptions, default_out_dir, demo_settings, trainer_config
from clora.demo.report import (
    CustomerReport,
    DemoReport,
    compact_table,
    interval_of,
    print_report,
    short_version,
    trainer_records,
    write,
)
from clora.demo.simulation import SimulatedCustomer, SimulatedOperator
from clora.evals.gate import Decision
from clora.evals.job import EvalJob
from clora.evals.scoring import EvalScore, admin_chat_client
from clora.evals.suites import EvalSuite, SuiteStore
from clora.stack import Stack


@dataclass
class Tenant:
    sim: SimulatedCustomer
    suite: EvalSuite  # gate set
    report_suite: EvalSuite
    before: EvalScore | None = None  # gate set, base model
    report_before: EvalScore | None = None
    served: str | None = None
    score: float | None = None
    published: int = 0
    requests: int = 0
    feedback: int = 0
    feedback_kinds: set[str] = field(default_factory=set)
    live: list[tuple[float, float]] = field(default_factory=list)
    evals: list[tuple[float, float]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def gain(self) -> float:
        return (self.score or 0.0) - (self.before.score if self.before else 0.0)


class Demo:
    def __init__(self, settings: Settings, options: DemoOptions, console: Console):
        self.settings, self.options, self.console = settings, options, console
        self.started = time.monotonic()
        # Before the engine starts: it exports settings for its children into this process's environment.
        self.started_at, self.command_line = dt.datetime.now(dt.timezone.utc), command("clora")
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
            await admin.set_trainer_config(name, trainer_config(self.options))
            suite = EvalSuite(environment=f"preference:{rule_spec}", n=self.options.eval_prompts,
                              max_tokens=self.options.max_tokens, split="gate")
            await suites.set(name, suite)  # what the promotion gate scores
            report_suite = suite.model_copy(update={"n": self.options.report_prompts, "split": "report"})
            simulated = SimulatedCustomer(name, rule_spec, key, stack.gateway_url, seed=len(self.tenants))
            self.tenants[name] = Tenant(simulated, suite, report_suite)
        await admin.close()
        # The operator's reference answers: the base model's greedy answer to the question (uncaptured).
        self.reference_client = admin_chat_client(stack.gateway_url, admin_key(self.settings), next(iter(DEMO_RULES)))

        async def reference(messages) -> str:
            reply = await self.reference_client.chat.completions.create(
                model=self.settings.serving.served_base_name, messages=messages, max_tokens=self.options.max_tokens,
                temperature=0.0)
            return reply.choices[0].message.content or ""

        return SimulatedOperator(stack.gateway_url, await store.create_operator("demo-operator", list(DEMO_RULES)),
                                 reference)

    # -- one round -------------------------------------------------------------------------------------
    async def traffic(self, operator: SimulatedOperator) -> None:
        """Every customer's agent asks a batch of questions and the operator reviews every answer,
        customers side by side (one's reviews overlap another's answers: fewer, fuller engine batches)."""
        await asyncio.gather(*[self._traffic(name, operator) for name in self.tenants])

    async def _traffic(self, name: str, operator: SimulatedOperator) -> None:
        tenant = self.tenants[name]
        exchanges = await tenant.sim.ask(self.options.requests_per_round, self.options.max_tokens)
        corrects = name not in SCORED_ONLY
        events = list(await asyncio.gather(*[operator.review(e, tenant.sim.env, corrects) for e in exchanges]))
        await operator.send(events)
        tenant.requests += len(exchanges)
        tenant.feedback += len(events)
        tenant.feedback_kinds |= {kind for e in events for kind in kinds_of(e)}
        good = [tenant.sim.env.reward(e.messages, Completion(e.answer, [])) for e in exchanges]
        tenant.live.append((self.minutes(), sum(good) / len(good)))

    async def trained(self, job: EvalJob) -> None:
        """Until every customer has a version newer than before the round (the trainer has learnt
        from the round's feedback), or `training_wait_s`: so that each round's gate sees what the
        round taught (the product's trainer and eval job keep their own clocks)."""
        before = {name: t.published for name, t in self.tenants.items()}
        deadline = time.monotonic() + self.options.training_wait_s
        while time.monotonic() < deadline:
            for name in self.tenants:
                self.tenants[name].published = (await job.admin.versions(name)).newest_number()
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
        tenant.published = listed.newest_number()
        served_score = (await job.score(name, tenant.suite, listed.current)).score
        if tenant.served != listed.current or not tenant.evals:
            tenant.evals.append((self.minutes(), served_score))
        tenant.served, tenant.score = listed.current, served_score

    def target_gain(self, name: str) -> float:
        """The gain a customer must show: less for one taught by scores alone (a weaker signal)."""
        return self.options.ratings_only_gain if name in SCORED_ONLY else self.options.target_gain

    def done(self) -> bool:
        """On the gate set's evidence (never the report set's): every customer past its target."""
        return all(t.gain() >= self.target_gain(name) + 0.1 for name, t in self.tenants.items())

    # -- display ---------------------------------------------------------------------------------------
    def view(self) -> Group:
        """The live table (its last state also ends up in a log): numbers in columns, the hidden rules
        as lines below it, so that it fits 80 columns (every answer is reviewed: feedback = requests)."""
        table = compact_table("customer", "requests", "live\nreward", "trained", "served", "eval\nbefore", "eval\nnow",
                              "last gate decision", title="clora demo")
        for name, t in self.tenants.items():
            last = t.decisions[-1] if t.decisions else None
            table.add_row(name, str(t.requests), f"{t.live[-1][1]:.2f}" if t.live else "-",
                          f"v{t.published}" if t.published else "-", short_version(t.served),
                          f"{t.before.score:.2f}" if t.before else "-",
                          f"{t.score:.2f}" if t.score is not None else "-",
                          f"{last.action} {short_version(last.candidate)}" if last else "-")
        rules = Text("\n".join(f"{name}'s hidden rule: {t.sim.rule.description}" for name, t in self.tenants.items()))
        status = Text(f"{self.phase} | round {self.round} | {self.minutes():.1f} / {self.options.minutes:.0f} min")
        if self.console.is_terminal:
            return Group(table, rules, status)
        return Group(table, rules, status, Text(""))  # into a log, rich's Live leaves its last line open

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
        job = EvalJob.connect(stack.redis, stack.gateway_url, admin_key(self.settings), self.settings.evals,
                              self.settings.serving.served_base_name)
        try:
            self.phase = "scoring the base model on every customer's gate and report sets"
            names, scoring_started = list(self.tenants), self.minutes()
            befores = await asyncio.gather(*[job.score(n, self.tenants[n].suite, None) for n in names],
                                           *[job.score(n, self.tenants[n].report_suite, None) for n in names])
            for i, name in enumerate(names):
                self.tenants[name].before, self.tenants[name].report_before = befores[i], befores[len(names) + i]
                await self.refresh(job, name)
            budget = Budget(self.options.minutes, report=max(2.0, 1.1 * (self.minutes() - scoring_started)))
            while budget.fits_a_round(self.minutes()) and not self.done() and self.round != self.options.max_rounds:
                self.round += 1
                round_started = self.minutes()
                self.phase = "live traffic and operator feedback"
                await self.traffic(operator)
                self.phase = "training on the round's feedback"
                await self.trained(job)
                self.phase = "promotion gate: scoring candidates"
                await self.gate(job)
                budget.ran(round_started, self.minutes())
            self.phase = "final report"
            return await self.report(job, stack)
        finally:
            await job.close()
            await operator.close()
            await self.reference_client.close()
            for t in self.tenants.values():
                await t.sim.close()

    async def report(self, job: EvalJob, stack: Stack) -> DemoReport:
        """The reported scores: the served versions on the report set (all customers at once)."""
        rules = {name: t.sim.rule for name, t in self.tenants.items()}
        names = list(self.tenants)
        finals = await asyncio.gather(*[job.score(n, self.tenants[n].report_suite, self.tenants[n].served)
                                        for n in names])
        gates = await asyncio.gather(*[job.score(n, self.tenants[n].suite, self.tenants[n].served) for n in names])
        paths = trainer_records(self.settings.trainer.metrics_port)
        customers = []
        for name, final, gate in zip(names, finals, gates):
            t, foreign = self.tenants[name], [r for other, r in rules.items() if other != name]

            def leak(score: EvalScore) -> float:
                return sum(any(r.check(a) for r in foreign) for a in score.answers) / max(1, len(score.answers))

            before = t.report_before
            customers.append(CustomerReport(
                customer=name, rule=t.sim.rule.name, eval_before=before.score, eval_after=final.score,
                eval_before_ci=interval_of(before), eval_after_ci=interval_of(final),
                content_before=before.content, content_after=final.content, gate_before=t.before.score,
                gate_after=gate.score, feedback_kinds=sorted(t.feedback_kinds), records_by_path=paths.get(name, {}),
                foreign_rule_rate=leak(final), foreign_rule_rate_before=leak(before), served_version=t.served,
                versions_published=t.published, promoted=sum(d.action == "promoted" for d in t.decisions),
                held_back=sum(d.action == "held-back" for d in t.decisions), requests=t.requests,
                feedback_events=t.feedback, live=t.live, evals=t.evals + [(self.minutes(), gate.score)]))
        passed = all(c.eval_after - c.eval_before >= self.target_gain(c.customer)
                     and c.foreign_rule_rate <= c.foreign_rule_rate_before
                     and (c.content_after or 0) >= 0.8 * (c.content_before or 0) for c in customers)
        # Off the event loop: git and the machine's description must not stall the gateway it serves.
        source = await asyncio.to_thread(provenance, "clora", settings=self.settings,
                                         config=trainer_config(self.options), ignore=("seed",),
                                         started_at=self.started_at, command_line=self.command_line)
        return DemoReport(**source, minutes=round(self.minutes(), 2), rounds=self.round,
                          requests_per_round=self.options.requests_per_round,
                          training_wait_s=self.options.training_wait_s, model=str(stack.model),
                          target_gain=self.options.target_gain,
                          ratings_only_gain=self.options.ratings_only_gain,
                          report_set_size=self.options.report_prompts, gate_set_size=self.options.eval_prompts,
                          passed=passed, customers=customers,
                          decisions=[d for t in self.tenants.values() for d in t.decisions])


def kinds_of(event) -> list[str]:
    """The kinds of feedback one event carries (an event may carry a rating and a correction)."""
    return [kind for kind, value in (("rating", event.rating), ("reward", event.reward),
                                     ("correction", event.correction)) if value is not None]


async def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoReport:
    out_dir = options.out_dir or default_out_dir(settings)
    report = await Demo(demo_settings(settings), options, console).run()
    print_report(report, console, write(report, out_dir))
    return report
