"""A runtime for RL benchmarks: `clora serve`'s stack (embedded Kafka and Redis, vLLM on one core;
its own trainer and periodic evals off) and a trainer wired as `clora train` wires it, in this
process, on the other core (one torch thread)."""

from __future__ import annotations

import asyncio
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.models import build_random_llama, ensure_tokenizer, resolve_model
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.stack import Stack
from clora.trainer.adapter_store import AdapterStore
from clora.trainer.data import TrainerIO
from clora.trainer.loop import Trainer, load_model
from clora.wire.trainer_config import TenantConfig

TINY = "tiny"  # a random-initialised 2-layer Llama with SmolLM2's tokenizer: mechanics in seconds


@dataclass
class BenchRuntime:
    stack: Stack
    settings: Settings
    io: TrainerIO
    trainer: Trainer
    keys: dict[str, str]  # each customer's API key

    @property
    def model(self) -> str:
        return str(self.settings.model)


def model_path(model: str | None, cache_dir: Path) -> str:
    """CLORA_MODEL's resolution, plus `tiny`."""
    if model == TINY:
        return str(build_random_llama(cache_dir / "tiny-llama-2x256", ensure_tokenizer(cache_dir)))
    return str(resolve_model(model, cache_dir))


@asynccontextmanager
async def bench_runtime(customers: dict[str, TenantConfig], model: str | None = None,
                        **settings_update: Any) -> AsyncIterator[BenchRuntime]:
    """The runtime with `customers` created and configured, in a fresh home (deleted by nobody:
    its logs stay for a look after a run)."""
    torch.set_num_threads(1)  # the trainer's core; vLLM's engine has the other
    base = Settings()
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    settings = base.model_copy(update={"home": home, "model": model_path(model or base.model, base.cache_dir),
                                       "port": 0, "trainer_enabled": False, "eval_interval_s": 0.0,
                                       **settings_update})
    stack = Stack(settings)
    await stack.start()
    serving = asyncio.create_task(stack.serve())
    try:
        while not stack.server.started:
            await asyncio.sleep(0.05)
        customer_store, configs = CustomerStore(stack.redis), TenantConfigStore(stack.redis)
        keys = {}
        for name, config in customers.items():
            keys[name] = await customer_store.create(name)
            await configs.set(name, config)
        torch_model, layers, tokenizer = await asyncio.to_thread(load_model, Path(settings.model), "cpu")
        runtime = RuntimeClient(stack.gateway_url, admin_key(settings))
        io = TrainerIO(AdapterStore(home / "trainer"), runtime, ReplayBuffer(stack.redis), configs, customer_store,
                       tokenizer, base_model=str(settings.model), served_base=settings.served_base_name)
        try:
            yield BenchRuntime(stack, settings, io, Trainer(torch_model, layers, io.store, io,
                                                            settings.trainer_pass_tokens or 512), keys)
        finally:
            await runtime.close()
    finally:
        await stack.stop()
        await asyncio.wait([serving], timeout=10)
