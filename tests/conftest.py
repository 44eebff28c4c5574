"""Real parts for every test: one Kafka-protocol broker, one Redis-protocol server and one clora
stack (vLLM serving a tiny random Llama with SmolLM2's tokenizer + the gateway) per session.

Factories hand out customers (with keys) and LoRA adapters for that tiny model.

Two lanes. A test that uses a real-stack fixture (`REAL_STACK`), is `slow` or is in one of the
`INTEGRATION_MODULES` is marked `integration` here; any other test that starts a process says so
with `@pytest.mark.integration`. `pytest -m "not integration"`
(`make unit`) runs the rest, the logic tests, in seconds; and fails the session if any of them
started a child process (an audit hook sees every spawn), so the lane stays what it says.
`make test` (CI) runs both, on two pytest-xdist workers: every test of the in-process stack on one
(`xdist_group("stack")`: one vLLM per session, as before), the tests that start runtimes of their own
first (`OWN_RUNTIME`, minutes each) so the longest work starts earliest, each worker's engines on a
core of their own (`CLORA_CPU_THREADS_BIND`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from clora.core.models import build_random_llama, ensure_tokenizer
from clora.core.services import start_broker, start_redis
from clora.core.settings import Settings
from clora.stack import Stack

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".clora" / "cache"  # survives between runs; never committed
ADMIN_KEY = "sk-clora-admin-test"
REAL_STACK = {"broker", "redis_url", "stack", "gateway", "engine", "admin", "make_customer", "sync_redis"}
ON_THE_STACK = {"stack", "gateway", "engine", "admin", "make_customer"}  # the session's one in-process stack
# Modules whose tests start `clora serve`, `clora demo` or `clora bench` runtimes of their own (CI
# minutes each), longest first: collected first, so two workers start on them before the short ones.
OWN_RUNTIME = ("test_soak", "test_serve_e2e", "test_bench_experiments", "test_upgrade", "test_demo")
SPAWN_EVENTS = {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn",
                "pty.spawn"}
# Modules whose tests start servers or processes of their own, or import vLLM, without a fixture
# saying so (a whole module: the test ids that start nothing stay with it for now).
INTEGRATION_MODULES = {
    "test_engine_process": "spawns engine processes", "test_services": "starts valkey and children",
    "test_lora_ops": "compares with vLLM's own ops", "test_capture": "starts its own broker",
    "test_ingest": "starts its own broker and valkey", "test_feedback_webhook": "stops and starts brokers",
    "test_namespace": "imports in fresh interpreters", "test_trainer_memory": "measures fresh interpreters",
}
_spawned: list[str] = []
_running = [""]  # the test being run, named in the report of a spawn


def unit_lane(config: pytest.Config) -> bool:
    return "not integration" in (config.option.markexpr or "")


def _watch_spawns(event: str, args: tuple) -> None:
    if event in SPAWN_EVENTS:
        _spawned.append(f"{_running[0] or 'collection'}: {event} {str(args[0] if args else '')[:160]}")


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _running[0] = nodeid


def pytest_configure(config: pytest.Config) -> None:
    if unit_lane(config):
        sys.addaudithook(_watch_spawns)  # for the rest of the process: hooks cannot be removed
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...: this worker's engines get a core
    if worker:  # of their own (vLLM's `auto` binds every engine to the same core)
        os.environ.pop("COLUMNS", None)  # xdist's 80 would fix the width of consoles made at import
        os.environ.setdefault("CLORA_CPU_THREADS_BIND", str(int(worker.removeprefix("gw")) % (os.cpu_count() or 1)))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The unit lane does not even import these modules (importing vLLM runs `uname`)."""
    return True if unit_lane(config) and collection_path.stem in INTEGRATION_MODULES else None


def _module(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""


@pytest.hookimpl(tryfirst=True)  # before xdist turns the groups into scheduling units
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if REAL_STACK & fixtures or item.get_closest_marker("slow") or _module(item) in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)  # the slow ones start servers of their own
        if ON_THE_STACK & fixtures:
            item.add_marker(pytest.mark.xdist_group("stack"))
    rank = {module: i for i, module in enumerate(OWN_RUNTIME)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: the rest keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup` a grouped test's id carries its group: if it does not, xdist scatters
    the stack's tests and every worker starts a stack of its own (pytest-xdist#1386). Say so."""
    if getattr(session.config.option, "loadgroup", False):
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"xdist_group ignored for {len(lost)} tests (e.g. {lost[0]}): pytest-xdist#1386")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The unit lane fails if anything in it started a process (a test that belongs in `integration`)."""
    if unit_lane(session.config) and _spawned:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"the unit lane started {len(_spawned)} child process(es); mark those tests `integration`:",
                 *_spawned[:20]]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return ensure_tokenizer(CACHE)


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir: Path) -> Path:
    return build_random_llama(CACHE / "tiny-llama-2x256", tokenizer_dir)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def broker(run_dir: Path):
    service = start_broker(run_dir / "broker")
    yield service.url
    service.stop()


@pytest.fixture(scope="session")
def redis_url(run_dir: Path):
    service = start_redis(run_dir / "redis-data", run_dir / "redis", persistent=False)
    yield service.url
    service.stop()


class StackThread:
    """A clora stack on its own event loop in a background thread, as `clora serve` runs it."""

    def __init__(self, settings: Settings):
        self.stack = Stack(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.stack.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._started.set()
            return
        serving = asyncio.create_task(self.stack.serve())
        while not self.stack.server.started and not serving.done():
            await asyncio.sleep(0.05)
        self._started.set()
        try:
            await serving
        finally:
            await self.stack.stop()

    def start(self, timeout_s: float = 400) -> "StackThread":
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("stack did not start")
        if self._error:
            raise self._error
        return self

    def call(self, coro, timeout_s: float = 60):
        """Run a coroutine on the stack's loop (for reaching into the router from a test)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self) -> None:
        if self.stack.server is not None:
            self.stack.server.should_exit = True
        self._thread.join(60)


@pytest.fixture(scope="session")
def stack(tiny_model: Path, broker: str, redis_url: str, run_dir: Path):
    settings = Settings(
        home=run_dir / "home", model=str(tiny_model), kafka_bootstrap=broker, redis_url=redis_url,
        port=0, admin_key=ADMIN_KEY, max_loras=2, max_cpu_loras=2, max_lora_rank=16, kv_cache_gib=1,
        max_model_len=1024, feedback_events_per_s=20,  # slow refill: the 429 test cannot race it
        trainer_enabled=False,  # trainer tests run their own
        engine_diagnosis_http=True,  # the `engine` fixture: vLLM straight, to compare against
        eval_interval_s=0,  # eval tests run the job themselves
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    running = StackThread(settings).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def gateway(stack: StackThread) -> str:
    return stack.stack.gateway_url


@pytest.fixture(scope="session")
def engine(stack: StackThread):
    """vLLM's own API, as `vllm serve` answers it (the engine's loopback port)."""
    with httpx.Client(base_url=stack.stack.engine.url, timeout=120) as client:
        yield client


@pytest.fixture
def admin(gateway: str):
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture
def make_customer(stack: StackThread, redis_url: str):
    """Creates a fresh customer; returns (name, api_key)."""
    import redis.asyncio as aioredis

    from clora.core.customers import CustomerStore

    def make(prefix: str = "cust") -> tuple[str, str]:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"

        async def create() -> str:
            client = aioredis.Redis.from_url(redis_url)
            try:
                return await CustomerStore(client).create(name)
            finally:
                await client.aclose()

        return name, stack.call(create())

    return make


@pytest.fixture(scope="session")
def make_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random (non-zero) LoRA adapter for the tiny model, saved as PEFT safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    out_root = tmp_path_factory.mktemp("adapters")

    def make(seed: int, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj")) -> Path:
        out = out_root / f"seed{seed}-r{rank}-{len(targets)}"
        if out.exists():
            return out
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=list(targets), init_lora_weights=False)
        model = get_peft_model(base, config)
        model.save_pretrained(out)
        model.unload()  # leave `base` unwrapped for the next adapter
        return out

    return make


@pytest.fixture(scope="session")
def sync_redis(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
