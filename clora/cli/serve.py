"""`clora serve`: the whole runtime in one process tree (see clora.stack)."""

from __future__ import annotations

import asyncio
import signal

import typer
from rich.panel import Panel

from clora.cli.common import console, exit_stopped, fail, run_serving, setup_logging
from clora.core.processes import ServiceStartError
from clora.core.settings import Settings
from clora.core.state import serve_state
from clora.stack import Stack


def serve(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Start the runtime: embedded Kafka/Redis unless configured, vLLM, and the gateway."""
    setup_logging(verbose)
    settings = Settings()
    if serve_state(settings):
        raise fail(f"clora serve is already running for {settings.home} (see {settings.state_file})")

    async def main() -> None:
        stack = Stack(settings)
        with console.status("Starting services and the engine (first start converts the model)..."):
            await stack.start()
        console.print(Panel.fit(
            f"gateway  [bold]{stack.gateway_url}/v1[/]  (OpenAI-compatible)\n"
            f"kafka    {stack.kafka_bootstrap}  topic {settings.stores.interactions_topic}\n"
            f"redis    {stack.redis_url}\nlogs     {stack.run_dir}\n"
            f"create a customer key: [bold]clora customers create NAME[/]", title="clora serve"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(stack.server, "should_exit", True))
        if settings.feedback.fault_hooks:  # the soak's ingestion fault, injected from outside the process
            loop.add_signal_handler(signal.SIGUSR1, stack.ingest.cancel_mid_batch)
        try:
            await stack.serve()
        finally:
            with console.status("Stopping..."):
                await stack.stop()

    try:
        run_serving(main())
    except ServiceStartError as exc:
        raise fail(str(exc)) from None
    exit_stopped(0)
