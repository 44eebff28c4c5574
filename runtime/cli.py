"""`clora`: the command line. Each command builds Settings once and wires what it needs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from runtime.customers import CustomerStore, InvalidName
from runtime.processes import ServiceStartError
from runtime.services import start_redis
from runtime.settings import Settings
from runtime.stack import Stack, admin_key

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


def _serve_state(settings: Settings) -> dict | None:
    """What a running `clora serve` wrote about itself, if it is still alive."""
    try:
        state = json.loads(settings.state_file.read_text())
        os.kill(state["pid"], 0)
        return state
    except (OSError, ValueError, KeyError):
        return None


@app.command()
def serve(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Start the runtime: embedded Kafka/Redis unless configured, vLLM, and the gateway."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    if _serve_state(settings):
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
        asyncio.run(main())
    except ServiceStartError as exc:
        raise _fail(str(exc)) from None


@app.command()
def ingest() -> None:
    """Run the ingestion consumer alone (feedback + interactions -> replay buffers)."""
    from feedback.consumer import IngestConsumer
    from feedback.replay import ReplayBuffer
    from runtime.stack import ingest_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings = Settings()
    state = _serve_state(settings) or {}
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
    from trainer.runtime_client import RuntimeClient
    from trainer.scheduler import Scheduler
    from trainer.service import TrainingService, load_trainer_model, resolve_device

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    state = _serve_state(settings) or {}
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


async def _with_customers(settings: Settings, action):
    """Run `action(store)` against the runtime's Redis; start the embedded one if nothing runs."""
    state = _serve_state(settings)
    service = None
    url = settings.redis_url or (state or {}).get("redis_url")
    if url is None:
        service = start_redis(settings.home / "redis", settings.runs_dir / "cli")
        url = service.url
    client = aioredis.Redis.from_url(url)
    try:
        return await action(CustomerStore(client))
    finally:
        await client.aclose()
        if service:
            service.stop()


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
    state = _serve_state(settings)
    if state is None:
        raise _fail("clora serve is not running (adapters are loaded into its engine)")
    resp = httpx.request(method, state["gateway_url"] + path, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {admin_key(settings)}"})
    if resp.status_code != 200:
        raise _fail(resp.json().get("error", {}).get("message", resp.text))
    return resp.json()


@adapters_app.command("publish")
def adapters_publish(customer: str, path: Path) -> None:
    """Publish a PEFT adapter dir as the customer's next version and switch traffic to it."""
    out = _admin(Settings(), "POST", f"/admin/customers/{customer}/adapters", {"path": str(path.resolve())})
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


if __name__ == "__main__":
    app()
