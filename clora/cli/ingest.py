"""`clora ingest`: the ingestion consumer alone (interactions + feedback -> replay buffers)."""

from __future__ import annotations

import asyncio
import signal

import redis.asyncio as aioredis

from clora.cli.common import fail, setup_logging
from clora.core.settings import Settings
from clora.core.state import serve_state
from clora.feedback.consumer import IngestConsumer
from clora.feedback.replay import ReplayBuffer
from clora.stack import ingest_config


def ingest() -> None:
    """Run the ingestion consumer alone (feedback + interactions -> replay buffers)."""
    setup_logging()
    settings = Settings()
    state = serve_state(settings) or {}
    bootstrap = settings.stores.kafka_bootstrap or state.get("kafka_bootstrap")
    url = settings.stores.redis_url or state.get("redis_url")
    if not bootstrap or not url:
        raise fail("set CLORA_KAFKA_BOOTSTRAP and CLORA_REDIS_URL, or start `clora serve` first")

    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        consumer = IngestConsumer(ingest_config(settings.stores, settings.feedback, bootstrap), client,
                                  ReplayBuffer(client, settings.feedback.replay_capacity,
                                               settings.feedback.replay_min_share))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, consumer.stop)
        try:
            await consumer.supervise()  # started again after a failure, as in `clora serve`
        finally:
            await client.aclose()

    asyncio.run(main())
