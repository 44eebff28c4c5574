"""`clora`: the command line. Each command builds Settings once and wires what it needs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import httpx
import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from runtime.adapters import AdapterRegistry
from runtime.customers import CustomerStore, InvalidName
from runtime.processes import ServiceStartError, become_engine_child, spawned_for_engine
from runtime.services import start_redis
from runtime.settings import Settings
from runtime.stack import Stack, admin_key, serve_state

if spawned_for_engine():  # this module is the main module of a process vLLM spawned from `clora serve`
    become_engine_child()

app = typer.Typer(help="clora: continual learning for LLM agents, one LoRA adapter per customer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
customers_app = typer.Typer(help="Customers and their API keys.", no_args_is_help=True)
adapters_app = typer.Typer(help="Adapter versions: publish, route (promote/rollback), list.",
                           no_args_is_help=True)
operators_app = typer.Typer(help="Operator keys: send feedback for a set of customers.", no_args_is_help=True)
app.add_typer(customers_app, name="customers")
app.add_typer(operators_app, name="operators")
app.add_typer(adapters_app, name="adapters")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def _exit_stopped(code: int) -> NoReturn:
    """Exit once everything we own is stopped, without the interpreter's finalisers: vLLM's and
    triton's native modules print leak reports and finaliser tracebacks at interpreter exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_serving(main):
    """The gateway's own cost per request is mostly event-loop and HTTP-parsing work: on uvloop
    (with uvicorn's httptools parser) it is lower than on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # not on every platform
        return asyncio.run(main)
    return uvloop.run(main)


@app.command()
def serve(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Start the runtime: embedded Kafka/Redis unless configured, vLLM, and the gateway."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    if serve_state(settings):
        raise _fail(f"clora serve is already running for {settings.home} (see {settings.state_file})")

    async def main() -> None:
        stack = Stack(settings)
        with console.status("Starting services and the engine (first start converts the model)..."):
            await stack.start()
        console.print(Panel.fit(
            f"gateway  [bold]{stack.gateway_url}/v1[/]  (OpenAI-compatible)\n"
            f"kafka    {stack.kafka_bootstrap}  topic {settings.interactions_topic}\n"
            f"redis    {stack.redis_url}\nlogs     {stack.run_dir}\n"
            f"create a customer key: [bold]clora customers create NAME[/]", title="clora serve"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(stack.server, "should_exit", True))
        try:
            await stack.serve()
        finally:
            with console.status("Stopping..."):
                await stack.stop()

    try:
        _run_serving(main())
    except ServiceStartError as exc:
        raise _fail(str(exc)) from None
    _exit_stopped(0)


@app.command()
def ingest() -> None:
    """Run the ingestion consumer alone (feedback + interactions -> replay buffers)."""
    from feedback.consumer import IngestConsumer
    from feedback.replay import ReplayBuffer
    from runtime.stack import ingest_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = Settings()
    state = serve_state(settings) or {}
    bootstrap = settings.kafka_bootstrap or state.get("kafka_bootstrap")
    url = settings.redis_url or state.get("redis_url")
    if not bootstrap or not url:
        raise _fail("set CLORA_KAFKA_BOOTSTRAP and CLORA_REDIS_URL, or start `clora serve` first")

    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        consumer = IngestConsumer(ingest_config(settings, bootstrap), client,
                                  ReplayBuffer(client, settings.replay_capacity))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, consumer.stop)
        try:
            await consumer.run()
        finally:
            await client.aclose()

    asyncio.run(main())


@app.command()
def train(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Run the trainer alone against a running `clora serve` (or CLORA_GATEWAY_URL + CLORA_REDIS_URL)."""
    from feedback.replay import ReplayBuffer
    from trainer.adapter_store import AdapterStore
    from trainer.config import TenantConfigStore
    from trainer.loop import Trainer
    from runtime.admin_client import RuntimeClient
    from trainer.scheduler import Scheduler
    from trainer.service import TrainingService, load_trainer_model, resolve_device

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    state = serve_state(settings) or {}
    gateway = settings.gateway_url or state.get("gateway_url")
    url = settings.redis_url or state.get("redis_url")
    model_dir = settings.model or state.get("model")
    if not gateway or not url or not model_dir:
        raise _fail("start `clora serve` first, or set CLORA_GATEWAY_URL, CLORA_REDIS_URL and CLORA_MODEL")
    device = resolve_device(settings.trainer_device)
    pass_tokens = settings.trainer_pass_tokens or (65536 if device.type == "cuda" else 512)

    async def main() -> None:
        model, layers, tokenizer = await asyncio.to_thread(load_trainer_model, Path(model_dir), device)
        client = aioredis.Redis.from_url(url)
        runtime = RuntimeClient(gateway, admin_key(settings))
        trainer = Trainer(model, layers, tokenizer,
                          AdapterStore(settings.trainer_dir, device, settings.trainer_keep_checkpoints), runtime,
                          ReplayBuffer(client, settings.replay_capacity), TenantConfigStore(client),
                          base_model=str(model_dir), pass_tokens=pass_tokens)
        service = TrainingService(trainer, Scheduler(settings.trainer_max_tenants), CustomerStore(client),
                                  settings.trainer_idle_s, settings.trainer_max_inflight)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger("clora.trainer").info("trainer up on %s (gateway %s)", device, gateway)
        try:
            await service.run(stop)
        finally:
            await runtime.close()
            await client.aclose()

    asyncio.run(main())


async def _with_redis(settings: Settings, action):
    """Run `action(redis)` against the runtime's Redis; start the embedded one if nothing runs."""
    state = serve_state(settings)
    service = None
    url = settings.redis_url or (state or {}).get("redis_url")
    if url is None:
        service = start_redis(settings.home / "redis", settings.runs_dir / "cli")
        url = service.url
    client = aioredis.Redis.from_url(url)
    try:
        return await action(client)
    finally:
        await client.aclose()
        if service:
            service.stop()


async def _with_customers(settings: Settings, action):
    return await _with_redis(settings, lambda client: action(CustomerStore(client)))


@customers_app.command("create")
def customers_create(name: str) -> None:
    """Create a customer and print its API key (shown once; only a hash is stored)."""
    try:
        key = asyncio.run(_with_customers(Settings(), lambda store: store.create(name)))
    except InvalidName as exc:
        raise _fail(str(exc)) from None
    err.print(f"created customer [bold]{name}[/]; its API key (store it now, it is not shown again):")
    console.print(key)


@customers_app.command("key")
def customers_key(name: str, revoke_old: bool = typer.Option(False, help="Revoke existing keys first.")) -> None:
    """Issue another API key for a customer."""
    async def action(store: CustomerStore) -> str:
        if revoke_old:
            await store.revoke_keys(name)
        return await store.issue_key(name)

    try:
        console.print(asyncio.run(_with_customers(Settings(), action)))
    except KeyError:
        raise _fail(f"no customer named {name!r}") from None


@customers_app.command("list")
def customers_list() -> None:
    """List customers."""
    rows = asyncio.run(_with_customers(Settings(), lambda store: store.list()))
    table = Table("customer", "created")
    for c in rows:
        table.add_row(c.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.created_at)))
    console.print(table)


@operators_app.command("create")
def operators_create(name: str, customer: list[str] = typer.Option(..., "--customer", "-c",
                                                                    help="A customer in scope (repeat).")) -> None:
    """Create an operator key scoped to the given customers (shown once; only a hash is stored)."""
    try:
        key = asyncio.run(_with_customers(Settings(), lambda store: store.create_operator(name, customer)))
    except InvalidName as exc:
        raise _fail(str(exc)) from None
    err.print(f"created operator [bold]{name}[/] for {', '.join(sorted(set(customer)))}; its key:")
    console.print(key)


def _admin(settings: Settings, method: str, path: str, body: dict | None = None) -> dict:
    state = serve_state(settings)
    if state is None:
        raise _fail("clora serve is not running (adapters are loaded into its engine)")
    resp = httpx.request(method, state["gateway_url"] + path, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {admin_key(settings)}"})
    if resp.status_code != 200:
        raise _fail(resp.json().get("error", {}).get("message", resp.text))
    return resp.json()


@adapters_app.command("publish")
def adapters_publish(customer: str, path: Path, candidate: bool = typer.Option(
        False, "--candidate", help="Only register it: the promotion gate (or `clora eval promote`) serves it.")) -> None:
    """Publish a PEFT adapter dir as the customer's next version and switch traffic to it."""
    out = _admin(Settings(), "POST", f"/admin/customers/{customer}/adapters",
                 {"path": str(path.resolve()), "switch": not candidate})
    if candidate:
        console.print(f"{customer}: candidate [bold]{out['name']}[/] registered (not served yet)")
    else:
        console.print(f"{customer} now served by [bold]{out['name']}[/] (load + switch {out['swap_ms']:.0f} ms)")


@adapters_app.command("route")
def adapters_route(customer: str, adapter: str) -> None:
    """Switch a customer to one of its versions (promote or roll back)."""
    out = _admin(Settings(), "PUT", f"/admin/customers/{customer}/route", {"adapter": adapter})
    console.print(f"{customer} now served by [bold]{out['name']}[/]")


@adapters_app.command("list")
def adapters_list(customer: str) -> None:
    """A customer's adapter versions; the current one is marked."""
    out = _admin(Settings(), "GET", f"/admin/customers/{customer}/adapters")
    table = Table("version", "current", "source", "path")
    for v in out["versions"]:
        table.add_row(v["name"], "*" if v["name"] == out["current"] else "", v["source"], v["path"])
    console.print(table)


@app.command()
def demo(minutes: float = typer.Option(14.0, help="Time budget for the whole run, start-up included."),
         requests_per_round: int = typer.Option(8, help="Questions each customer's agent asks per round."),
         max_rounds: int = typer.Option(0, help="Stop after this many rounds (0: when learnt or out of time)."),
         out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where demo.json and demo.png go.")) -> None:
    """Simulated customers with hidden preferences learn live: traffic, operator feedback, training,
    the promotion gate; ends with a report (table, JSON, PNG). Starts everything on embedded defaults."""
    from runtime.demo import DemoOptions, run_demo

    settings = Settings()
    if serve_state(settings):
        raise _fail("`clora serve` is running: the demo starts its own stack; stop it first")
    log_file = settings.home / "demo.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # the screen is the live table
    for noisy in ("kafka", "httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options = DemoOptions(minutes=minutes, requests_per_round=requests_per_round, out_dir=out_dir,
                          max_rounds=max_rounds or None)
    try:
        report = _run_serving(run_demo(settings, options, console))
    except ServiceStartError as exc:
        raise _fail(str(exc)) from None
    _exit_stopped(0 if report.passed else 1)


# -- evals and the promotion gate -------------------------------------------------------------------
eval_app = typer.Typer(help="Eval suites, the promotion gate, manual promote/rollback. Alone: the table.",
                       invoke_without_command=True)
app.add_typer(eval_app, name="eval")


def _stamp(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


@eval_app.callback()
def eval_table(ctx: typer.Context) -> None:
    """Per customer: suite, served version and its score, the last gate decision."""
    if ctx.invoked_subcommand is not None:
        return
    from evals.gate import EvalHistory
    from evals.suites import SuiteStore

    async def rows(client: aioredis.Redis) -> list[tuple[str, ...]]:
        history, routes = EvalHistory(client), await AdapterRegistry(client, Settings().adapters_dir).routes()
        out = []
        for customer, suite in (await SuiteStore(client).all()).items():
            served = routes[customer].name if customer in routes else None
            score = await history.cached_score(f"{customer}/{served or Settings().served_base_name}",
                                               suite.fingerprint())
            last = (await history.decisions(customer, 1) or [None])[-1]
            out.append((customer, suite.environment or f"golden x{len(suite.golden)}", served or "base",
                        f"{score.score:.3f}" if score else "-",
                        f"{last.action} {last.candidate or 'base'}" if last else "-",
                        last.reason if last else "", _stamp(last.at if last else None)))
        return out

    table = Table("customer", "suite", "served", "score", "last decision", "why", "when")
    for row in asyncio.run(_with_redis(Settings(), rows)):
        table.add_row(*row)
    console.print(table)


@eval_app.command("suite")
def eval_suite(customer: str,
               environment: str = typer.Option(..., "--env", help="e.g. preference:json, arithmetic:1"),
               n: int = typer.Option(16, help="Prompts per evaluation."),
               seed: int = typer.Option(1_000_003, help="Held-out seed (keep it away from training seeds)."),
               max_tokens: int = typer.Option(64)) -> None:
    """Set a customer's eval suite (an environment's held-out prompts)."""
    from agents.envs import make_env
    from evals.suites import EvalSuite, SuiteStore

    if not environment.startswith("arithmetic:"):
        try:
            make_env(environment)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    suite = EvalSuite(environment=environment, n=n, seed=seed, max_tokens=max_tokens)

    async def action(client: aioredis.Redis) -> None:
        if not await CustomerStore(client).exists(customer):
            raise _fail(f"no customer named {customer!r}")
        await SuiteStore(client).set(customer, suite)

    asyncio.run(_with_redis(Settings(), action))
    console.print(f"{customer}: eval suite {environment} (n={n}, seed={seed}, fingerprint {suite.fingerprint()})")


async def _with_eval_job(action):
    from evals.job import EvalJob

    settings = Settings()
    state = serve_state(settings)
    if state is None:
        raise _fail("clora serve is not running (evals query its engine)")
    client = aioredis.Redis.from_url(state["redis_url"])
    job = EvalJob.connect(client, state["gateway_url"], admin_key(settings), settings)
    try:
        return await action(job)
    finally:
        await job.close()
        await client.aclose()


def _print_decisions(decisions) -> None:
    table = Table("customer", "decision", "candidate", "score", "served before", "score", "why")
    for d in decisions:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(d.customer, d.action, d.candidate or "base", fmt(d.candidate_score), d.current or "base",
                      fmt(d.current_score), d.reason)
    console.print(table)


@eval_app.command("run")
def eval_run(every: float = typer.Option(0.0, help="Repeat every N seconds (0: one round).")) -> None:
    """Score served and candidate versions now; the gate promotes or holds back."""
    async def action(job) -> None:
        while True:
            decisions = await job.run_once()
            _print_decisions(decisions) if decisions else console.print("no new candidates")
            if not every:
                return
            await asyncio.sleep(every)

    asyncio.run(_with_eval_job(action))


@eval_app.command("promote")
def eval_promote(customer: str, version: str) -> None:
    """Serve a version now, bypassing the gate (logged in the eval history)."""
    _print_decisions([asyncio.run(_with_eval_job(lambda job: job.promote(customer, version)))])


@eval_app.command("rollback")
def eval_rollback(customer: str) -> None:
    """Serve again the version promoted before the current one."""
    async def action(job):
        try:
            return await job.rollback(customer)
        except LookupError as exc:
            raise _fail(str(exc)) from None

    _print_decisions([asyncio.run(_with_eval_job(action))])


@eval_app.command("history")
def eval_history(customer: str, last: int = typer.Option(20, help="Newest decisions shown.")) -> None:
    """A customer's gate decisions, oldest first."""
    from evals.gate import EvalHistory

    decisions = asyncio.run(_with_redis(Settings(), lambda client: EvalHistory(client).decisions(customer, last)))
    _print_decisions(decisions)


if __name__ == "__main__":
    app()
