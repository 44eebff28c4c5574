"""A runtime for RL benchmarks: `clora serve`'s stack (embedded Kafka and Redis, vLLM on one core;
its own trainer and periodic evals off) and a trainer wired as `clora train` wires it, with its
torch threads (`CLORA_TRAINER_THREADS`): in a process of its own (`TrainerProcess`, as `clora
serve` runs it), or in this process (`inline_trainer`, for benchmarks that call a step directly).

Why a process of its own: a training pass in the serving process (gateway, vLLM's front end and
their threads) ran 13-17 s where the same pass took 8-11 s alone (SmolLM2-135M, 8 x 160 tokens,
one thread; /tmp measurements of issue 19): its allocations and page faults contend with the
serving threads' in one address space."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import shutil
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Concatenate, ParamSpec, TypeVar

from clora.core.customers import CustomerStore
from clora.core.models import build_random_llama, ensure_tokenizer, resolve_model
from clora.core.settings import Settings
from clora.core.state import admin_key
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.stack import Stack
from clora.trainer.loop import Trainer, connect
from clora.trainer.run import TrainRun
from clora.wire.trainer_config import TenantConfig

TINY = "tiny"  # a random-initialised 2-layer Llama with SmolLM2's tokenizer: mechanics in seconds
P = ParamSpec("P")
R = TypeVar("R")
# A job the trainer process runs: job(trainer, progress, stop, *args); `progress(n)` advances the
# caller's progress bar, `stop` is set when the caller asks the job to end.
Job = Callable[Concatenate[Trainer, Callable[[int], None], asyncio.Event, P], Awaitable[R]]


@dataclass
class BenchRuntime:
    stack: Stack
    settings: Settings
    replay: ReplayBuffer
    keys: dict[str, str]  # each customer's API key

    @property
    def model(self) -> str:
        return str(self.settings.serving.model)

    def train_run(self) -> TrainRun:
        """What `clora train` would run with against this runtime."""
        return TrainRun.from_settings(self.settings, gateway_url=self.stack.gateway_url,
                                      redis_url=self.stack.redis_url, model_dir=self.model,
                                      admin_key=admin_key(self.settings))


def model_path(model: str | None, cache_dir: Path) -> str:
    """CLORA_MODEL's resolution, plus `tiny`."""
    if model == TINY:
        return str(build_random_llama(cache_dir / "tiny-llama-2x256", ensure_tokenizer(cache_dir)))
    return str(resolve_model(model, cache_dir))


@asynccontextmanager
async def bench_runtime(customers: dict[str, TenantConfig], model: str | None = None,
                        **settings_update: Any) -> AsyncIterator[BenchRuntime]:
    """The runtime with `customers` created and configured, in a fresh home. Its logs (`runs/`)
    stay for a look after a run; the rest (adapter versions, checkpoints: GBs after a sweep) goes."""
    base = Settings()
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    settings = base.updated(**{"home": home, "model": model_path(model or base.serving.model, base.cache_dir),
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
        yield BenchRuntime(stack, settings, ReplayBuffer(stack.redis), keys)
    finally:
        await stack.stop()
        await asyncio.wait([serving], timeout=10)
        for path in home.iterdir():
            if path == settings.runs_dir:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@asynccontextmanager
async def inline_trainer(runtime: BenchRuntime) -> AsyncIterator[Trainer]:
    """`clora train`'s trainer in this process (its compute in a thread: see the module's note)."""
    async with connect(runtime.train_run()) as trainer:
        yield trainer


# -- the trainer process -----------------------------------------------------------------------
_worker: dict[str, Any] = {}  # in the trainer process: its event loop, trainer, progress queue, stop event


def _start_worker(run: TrainRun, progress: Any, stop: Any, log_path: str) -> None:
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = asyncio.new_event_loop()
    connection = connect(run)
    _worker.update(loop=loop, connection=connection, trainer=loop.run_until_complete(connection.__aenter__()),
                   progress=progress, stop=stop)


async def _with_stop(job: Job, args: tuple) -> Any:
    stop, flag = asyncio.Event(), _worker["stop"]

    async def watch() -> None:  # the caller's stop (a process-shared flag) as this loop's event
        while not flag.is_set():
            await asyncio.sleep(0.1)
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        return await job(_worker["trainer"], _worker["progress"].put, stop, *args)
    finally:
        watcher.cancel()


async def _ready(_trainer: Trainer, _progress: Callable[[int], None], _stop: asyncio.Event) -> None:
    """A job that does nothing: running it starts the process and loads the model."""


def _run_job(job: Job, args: tuple) -> Any:
    return _worker["loop"].run_until_complete(_with_stop(job, args))


class TrainerProcess:
    """`clora train`'s trainer (the model loaded once) in a spawned process, running jobs one at a
    time: `await trainer.run(job, *args, progress=...)`, where `job` is a module-level coroutine
    function `job(trainer, progress, stop, *args)` and its result comes back pickled. Its log is
    `trainer.log` in the runtime's run directory."""

    def __init__(self, runtime: BenchRuntime):
        context = mp.get_context("spawn")
        self.log_path = runtime.stack.run_dir / "trainer.log"
        self._progress, self._stop = context.Queue(), context.Event()
        self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker,
                                         initargs=(runtime.train_run(), self._progress, self._stop, str(self.log_path)))
        self._advance: Callable[[int], None] = lambda _n: None
        self._reader = threading.Thread(target=self._read_progress, daemon=True)
        self._reader.start()

    def _read_progress(self) -> None:
        while (n := self._progress.get()) is not None:
            self._advance(n)

    async def run(self, job: Job, *args: Any, progress: Callable[[int], None] = lambda _n: None) -> Any:
        self._advance = progress
        self._stop.clear()
        return await asyncio.get_running_loop().run_in_executor(self._pool, _run_job, job, args)

    async def ready(self) -> None:
        """Once the process is up and its model loaded (it starts on the first job otherwise)."""
        await self.run(_ready)

    def stop(self) -> None:
        """Ask the running job to end (its `stop` event is set)."""
        self._stop.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._progress.put(None)
        self._reader.join(timeout=5)


@asynccontextmanager
async def trainer_process(runtime: BenchRuntime) -> AsyncIterator[TrainerProcess]:
    trainer = TrainerProcess(runtime)
    try:
        yield trainer
    finally:
        trainer.stop()
        await asyncio.to_thread(trainer.close)
