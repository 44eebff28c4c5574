"""`clora eval`: eval suites, the promotion gate, manual promote/rollback; alone, the table."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
import typer
from rich.table import Table

from clora.agents.catalog import make_env
from clora.cli.common import console, fail, running_gateway, with_redis
from clora.core.customers import CustomerStore
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.evals.gate import Decision, EvalHistory
from clora.evals.job import EvalJob
from clora.evals.scoring import shown
from clora.evals.suites import EvalSuite, SuiteStore
from clora.runtime.adapters import AdapterRegistry

eval_app = typer.Typer(help="Eval suites, the promotion gate, manual promote/rollback. Alone: the table.",
                       invoke_without_command=True)


def _stamp(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


@eval_app.callback()
def eval_table(ctx: typer.Context) -> None:
    """Per customer: suite, served version and its score, the last gate decision."""
    if ctx.invoked_subcommand is not None:
        return
    settings = Settings()

    async def rows(client: aioredis.Redis) -> list[tuple[str, ...]]:
        history, routes = EvalHistory(client), await AdapterRegistry(client, settings.adapters_dir).routes()
        out = []
        for customer, suite in (await SuiteStore(client).all()).items():
            served = routes[customer].name if customer in routes else None
            score = await history.cached_score(f"{customer}/{served or settings.serving.served_base_name}",
                                               suite.fingerprint())
            last = (await history.decisions(customer, 1) or [None])[-1]
            out.append((customer, suite.environment or f"golden x{len(suite.golden)}", served or "base",
                        shown(score),
                        f"{last.action} {last.candidate or 'base'}" if last else "-",
                        last.reason if last else "", _stamp(last.at if last else None)))
        return out

    table = Table("customer", "suite", "served", "score [90% interval]", "last decision", "why", "when")
    for row in asyncio.run(with_redis(settings, rows)):
        table.add_row(*row)
    console.print(table)


@eval_app.command("suite")
def eval_suite(customer: str,
               environment: str = typer.Option(..., "--env", help="e.g. preference:json, arithmetic:1"),
               n: int = typer.Option(16, help="Prompts per evaluation."),
               seed: int = typer.Option(1_000_003, help="Held-out seed (keep it away from training seeds)."),
               max_tokens: int = typer.Option(64)) -> None:
    """Set a customer's eval suite (an environment's held-out prompts)."""
    if not environment.startswith("arithmetic:"):
        try:
            make_env(environment)
        except ValueError as exc:
            raise fail(str(exc)) from None
    suite = EvalSuite(environment=environment, n=n, seed=seed, max_tokens=max_tokens)

    async def action(client: aioredis.Redis) -> None:
        if not await CustomerStore(client).exists(customer):
            raise fail(f"no customer named {customer!r}")
        await SuiteStore(client).set(customer, suite)

    asyncio.run(with_redis(Settings(), action))
    console.print(f"{customer}: eval suite {environment} (n={n}, seed={seed}, fingerprint {suite.fingerprint()})")


def _with_eval_job(action):
    """`action(job)` with the eval job wired to the running `clora serve`."""
    settings = Settings()
    state = running_gateway(settings, "evals query its engine")

    async def main():
        client = aioredis.Redis.from_url(state["redis_url"])
        job = EvalJob.connect(client, state["gateway_url"], admin_key(settings), settings.evals,
                              settings.serving.served_base_name)
        try:
            return await action(job)
        finally:
            await job.close()
            await client.aclose()

    return asyncio.run(main())


def _print_decisions(decisions: list[Decision]) -> None:
    table = Table("customer", "decision", "candidate", "score", "served before", "score", "best served", "why")
    for d in decisions:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        best = f"{d.best or 'base'} {fmt(d.best_score)}" if d.best_score is not None else "-"
        table.add_row(d.customer, d.action, d.candidate or "base", fmt(d.candidate_score), d.current or "base",
                      fmt(d.current_score), best, d.reason)
    console.print(table)


@eval_app.command("run")
def eval_run(every: float = typer.Option(0.0, help="Repeat every N seconds (0: one round).")) -> None:
    """Score served and candidate versions now; the gate promotes or holds back."""
    async def action(job: EvalJob) -> None:
        while True:
            decisions = await job.run_once()
            _print_decisions(decisions) if decisions else console.print("no new candidates")
            if not every:
                return
            await asyncio.sleep(every)

    _with_eval_job(action)


@eval_app.command("promote")
def eval_promote(customer: str, version: str) -> None:
    """Serve a version now, bypassing the gate (logged in the eval history)."""
    _print_decisions([_with_eval_job(lambda job: job.promote(customer, version))])


@eval_app.command("rollback")
def eval_rollback(customer: str) -> None:
    """Serve again the version promoted before the current one."""
    async def action(job: EvalJob) -> Decision:
        try:
            return await job.rollback(customer)
        except LookupError as exc:
            raise fail(str(exc)) from None

    _print_decisions([_with_eval_job(action)])


@eval_app.command("history")
def eval_history(customer: str, last: int = typer.Option(20, help="Newest decisions shown.")) -> None:
    """A customer's gate decisions, oldest first."""
    decisions = asyncio.run(with_redis(Settings(), lambda client: EvalHistory(client).decisions(customer, last)))
    _print_decisions(decisions)
