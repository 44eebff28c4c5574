"""`clora train`: the trainer against a running runtime (a child of `clora serve`, or alone)."""

from __future__ import annotations

import asyncio

import typer

from clora.cli.common import fail, setup_logging
from clora.core.settings import Settings
from clora.core.state import admin_key, serve_state


def train(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Run the trainer alone against a running `clora serve` (or CLORA_GATEWAY_URL + CLORA_REDIS_URL)."""
    # Imported here: torch loads only for the commands that train, not for every `clora` call.
    from clora.trainer.loop import main
    from clora.trainer.run import TrainRun

    setup_logging(verbose)
    settings = Settings()
    state = serve_state(settings) or {}
    gateway = settings.trainer.gateway_url or state.get("gateway_url")
    url = settings.stores.redis_url or state.get("redis_url")
    model_dir = settings.serving.model or state.get("model")
    if not gateway or not url or not model_dir:
        raise fail("start `clora serve` first, or set CLORA_GATEWAY_URL, CLORA_REDIS_URL and CLORA_MODEL")
    run = TrainRun.from_settings(settings, gateway_url=gateway, redis_url=url, model_dir=model_dir,
                                 admin_key=admin_key(settings))
    asyncio.run(main(run))
