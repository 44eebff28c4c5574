"""`clora train`: the trainer against a running runtime (a child of `clora serve`, or alone)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import redis.asyncio as aioredis
import typer

from clora.cli.common import fail, setup_logging
from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.settings import Settings
from clora.core.state import admin_key, serve_state


def train(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Run the trainer alone against a running `clora serve` (or CLORA_GATEWAY_URL + CLORA_REDIS_URL)."""
    # Imported here: torch loads only for the commands that train, not for every `clora` call.
    from clora.feedback.replay import ReplayBuffer
    from clora.trainer.adapter_store import AdapterStore
    from clora.trainer.config import TenantConfigStore
    from clora.trainer.loop import Trainer
    from clora.trainer.scheduler import Scheduler
    from clora.trainer.service import TrainingService, load_trainer_model, resolve_device

    setup_logging(verbose)
    settings = Settings()
    state = serve_state(settings) or {}
    gateway = settings.gateway_url or state.get("gateway_url")
    url = settings.redis_url or state.get("redis_url")
    model_dir = settings.model or state.get("model")
    if not gateway or not url or not model_dir:
        raise fail("start `clora serve` first, or set CLORA_GATEWAY_URL, CLORA_REDIS_URL and CLORA_MODEL")
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
