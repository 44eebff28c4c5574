"""What every command shares: the consoles, one-line failures, logging set-up, and the ways a
command reaches a running runtime (its Redis; its admin API)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import httpx
import redis.asyncio as aioredis
import typer
from rich.console import Console

from clora.core.admin_client import RuntimeClient
from clora.core.services import start_redis
from clora.core.settings import Settings
from clora.core.state import admin_key, serve_state

T = TypeVar("T")
console = Console()
err = Console(stderr=True)
QUIET_LOGGERS = ("kafka", "httpx", "openai")


def fail(message: str) -> typer.Exit:
    """Print one red line and return the exit to raise (`raise fail(...)`)."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def setup_logging(verbose: bool = False, file: Path | None = None) -> None:
    """The one logging set-up of every command: INFO (DEBUG with --verbose) to stderr or a file;
    the client libraries' per-request lines only as warnings."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, filename=file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_stopped(code: int) -> NoReturn:
    """Exit once everything we own is stopped, without the interpreter's finalisers: vLLM's and
    triton's native modules print leak reports and finaliser tracebacks at interpreter exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_serving(main: Awaitable[T]) -> T:
    """The gateway's own cost per request is mostly event-loop and HTTP-parsing work: on uvloop
    (with uvicorn's httptools parser) it is lower than on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # not on every platform
        return asyncio.run(main)
    return uvloop.run(main)


async def with_redis(settings: Settings, action: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run `action(redis)` against the runtime's Redis; start the embedded one if nothing runs."""
    state = serve_state(settings)
    service = None
    url = settings.stores.redis_url or (state or {}).get("redis_url")
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


def running_gateway(settings: Settings, why: str) -> dict:
    """The running `clora serve`'s state; a one-line failure (saying `why` it is needed) if none."""
    state = serve_state(settings)
    if state is None:
        raise fail(f"clora serve is not running ({why})")
    return state


def call_admin(settings: Settings, action: Callable[[RuntimeClient], Awaitable[T]], why: str) -> T:
    """`action(client)` with the admin API client of the running `clora serve`; an error answer
    becomes a one-line failure with the gateway's own message."""
    gateway = running_gateway(settings, why)["gateway_url"]

    async def main() -> T:
        client = RuntimeClient(gateway, admin_key(settings), timeout_s=120)
        try:
            return await action(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except httpx.HTTPStatusError as exc:
        try:
            message = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.response.text
        raise fail(message) from None
