"""The vLLM engine: hosted in this process, health-checked, restarted when it dies.

vLLM's OpenAI server is two parts: a frontend (HTTP, chat templates, tokenising, detokenising,
the OpenAI JSON) and an engine core process that schedules and runs the model. We run the
frontend inside the gateway's process and call its ASGI app directly, without a socket: the
gateway -> vLLM HTTP hop cost ~0.7 ms of the ~2.9 ms the gateway used to add per request (2
cores). The engine core stays a child process, as in `vllm serve`; when it dies the frontend is
rebuilt. We use vLLM's own app building blocks and its OpenAI routes, so requests behave exactly as
against `vllm serve` with the same arguments. That app is also served as is on a loopback port
(`url`, no auth, as `vllm serve` would), for diagnosis and the benchmarks' straight-to-vLLM path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from clora.core.models import CHAT_TEMPLATE
from clora.core.processes import ServiceStartError, free_port, tail_line
from clora.core.settings import Settings

log = logging.getLogger("clora.engine")
HOST = "127.0.0.1"

# PEFT module names -> the packed vLLM module that serves them.
_PEFT_TO_VLLM = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


class EngineUnavailable(RuntimeError):
    """The engine is down or restarting; callers answer 503."""


class AdapterRejected(ValueError):
    """The adapter does not fit this engine (rank, modules, files); callers answer 4xx."""


@dataclass
class EngineConfig:
    model: str
    log_dir: Path
    cache_dir: Path
    served_base_name: str = "base"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 16
    lora_target_modules: list[str] | None = None
    kv_cache_gib: float = 2.0
    cpu_threads_bind: str = "auto"
    enforce_eager: bool = True
    start_timeout_s: float = 300.0
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings, model: str, log_dir: Path) -> "EngineConfig":
        return cls(
            model=model, log_dir=log_dir, cache_dir=settings.cache_dir, 
            served_base_name=settings.served_base_name, dtype=settings.dtype,
            max_model_len=settings.max_model_len, max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras, max_lora_rank=settings.max_lora_rank,
            lora_target_modules=settings.lora_target_modules, kv_cache_gib=settings.kv_cache_gib,
            cpu_threads_bind=settings.cpu_threads_bind, enforce_eager=settings.enforce_eager,
            start_timeout_s=settings.engine_start_timeout_s, extra_args=settings.engine_extra_args,
        )

    @property
    def log_path(self) -> Path:
        return self.log_dir / "vllm.log"

    def argv(self) -> list[str]:
        """`vllm serve` arguments; parsed by vLLM's own parser, so every flag means what it does there."""
        args = [
            "--model", self.model, "--served-model-name", self.served_base_name, "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--chat-template", str(CHAT_TEMPLATE), "--disable-uvicorn-access-log",
            # Compact JSON for response_format: small models otherwise wander off into whitespace.
            "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        ]
        if self.lora_target_modules:
            args += ["--lora-target-modules", *self.lora_target_modules]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + self.extra_args

    def env(self) -> dict[str, str]:
        """vLLM reads these at import and its child processes inherit them."""
        return {
            # The engine core is started from a process with threads (Kafka, Redis, the event
            # loop's executor): fork could copy a held lock into the child. Spawn starts clean.
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            "VLLM_ENGINE_READY_TIMEOUT_S": str(int(self.start_timeout_s)),
            "VLLM_LOGGING_CONFIG_PATH": str(self._logging_config()),
            "CLORA_ENGINE_LOG": str(self.log_path.resolve()),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(self.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind,
            "VLLM_CACHE_ROOT": str((self.cache_dir / "vllm").resolve()),
            "TORCHINDUCTOR_CACHE_DIR": str((self.cache_dir / "torchinductor").resolve()),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }

    def _logging_config(self) -> Path:
        """vLLM's log lines (this process and its children) go to the run dir, not our console."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "vllm-logging.json"
        path.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(process)d %(filename)s:%(lineno)d] "
                                              "%(message)s", "datefmt": "%m-%d %H:%M:%S"}},
            "handlers": {"vllm": {"class": "logging.FileHandler", "formatter": "vllm",
                                  "filename": str(self.log_path.resolve()), "level": "INFO"}},
            "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
        }))
        return path

    def validate_adapter(self, path: Path) -> None:
        """vLLM silently drops modules it does not serve: refuse such adapters instead."""
        config_file = path / "adapter_config.json"
        if not config_file.exists() or not any(path.glob("adapter_model.*")):
            raise AdapterRejected(f"{path} is not a PEFT adapter directory")
        config = json.loads(config_file.read_text())
        rank = int(config.get("r", 0))
        if rank > self.max_lora_rank:
            raise AdapterRejected(f"adapter rank {rank} exceeds the engine's max_lora_rank {self.max_lora_rank}")
        if self.lora_target_modules:
            targets = config.get("target_modules") or []
            targets = [targets] if isinstance(targets, str) else targets
            served = set(self.lora_target_modules)
            dropped = sorted({t for t in targets if _PEFT_TO_VLLM.get(t.split(".")[-1], t) not in served})
            if dropped:
                raise AdapterRejected(f"adapter targets {dropped}, which this engine does not serve")


class EngineResponse:
    """One answer of vLLM's app: status first, then the body as it is produced (streams too)."""

    def __init__(self) -> None:
        self.status = 0
        self.media_type: str | None = "application/json"
        self.started = asyncio.Event()
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.gone = asyncio.Event()  # the caller is done: vLLM sees a disconnect (aborts a stream)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])

    async def text(self) -> str:
        return (await self.read()).decode(errors="replace")

    def release(self) -> None:
        self.gone.set()


class EngineClient:
    """vLLM's OpenAI app called in-process (ASGI): inference and the LoRA admin endpoints.

    `app` is None while the engine is down; calls then raise EngineUnavailable."""

    def __init__(self) -> None:
        self.app: Any = None

    async def request(self, method: str, path: str, body: bytes = b"") -> EngineResponse:
        app = self.app
        if app is None:
            raise EngineUnavailable("the engine is not running")
        resp = EngineResponse()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": (HOST, 0), "server": (HOST, 0)}
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await resp.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                resp.status = message["status"]
                resp.media_type = dict(message.get("headers") or []).get(b"content-type", b"").decode() or None
                resp.started.set()
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    resp.chunks.put_nowait(message["body"])
                if not message.get("more_body"):
                    resp.chunks.put_nowait(None)

        def finished(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None and not resp.started.is_set():
                log.error("engine app failed on %s: %r", path, task.exception())
            resp.started.set()
            resp.chunks.put_nowait(None)  # an app that ended without a final body chunk

        task = asyncio.get_running_loop().create_task(app(scope, receive, send))
        task.add_done_callback(finished)
        await resp.started.wait()
        if resp.status == 0:
            raise EngineUnavailable("the engine failed the request without an answer")
        return resp

    async def chat(self, body: dict) -> EngineResponse:
        """A chat request; the caller reads (or streams) and releases the response."""
        return await self.request("POST", "/v1/chat/completions", orjson.dumps(body))

    async def _json(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        resp = await self.request(method, path, orjson.dumps(body) if body is not None else b"")
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    async def healthy(self) -> bool:
        try:
            return (await self._json("GET", "/health"))[0] == 200
        except EngineUnavailable:
            return False

    async def warm_up(self, model: str) -> None:
        """The first request after start pays one-off costs (~10 s on CPU); pay them before traffic."""
        await self._json("POST", "/v1/chat/completions",
                         {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

    async def load_adapter(self, name: str, path: Path) -> None:
        status, text = await self._json("POST", "/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": str(path.resolve())})
        if status != 200 and b"already been loaded" not in text:
            raise AdapterRejected(f"engine refused adapter {name}: {status} {text[:300].decode(errors='replace')}")

    async def unload_adapter(self, name: str) -> None:
        try:
            status, text = await self._json("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except EngineUnavailable:
            return  # a restarted engine has no adapters loaded
        if status not in (200, 404):
            log.warning("unloading %s failed: %s %s", name, status, text[:200])

    async def served_models(self) -> list[str]:
        status, text = await self._json("GET", "/v1/models")
        if status != 200:
            raise EngineUnavailable(f"listing models failed: {status}")
        return [m["id"] for m in orjson.loads(text)["data"]]

    async def aclose(self) -> None:
        self.app = None


OnReady = Callable[[EngineClient], Awaitable[None]]


class EngineManager:
    """Owns the engine; `ready` is set only while it is healthy and adapters are reloaded."""

    def __init__(self, config: EngineConfig, on_ready: OnReady | None = None):
        self.config = config
        self.on_ready = on_ready
        self.client = EngineClient()
        self.port = free_port(HOST)
        self.url = f"http://{HOST}:{self.port}"
        self.ready = asyncio.Event()
        self.restarts = 0
        self.engine: Any = None  # vLLM's AsyncLLM
        self._stack: AsyncExitStack | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def engine_core_pids(self) -> list[int]:
        """The engine core process(es): what dies when the engine crashes."""
        manager = getattr(getattr(getattr(self.engine, "engine_core", None), "resources", None), "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", [])] if manager else []

    async def start(self) -> None:
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def _launch(self) -> None:
        os.environ.update(self.config.env())  # before vLLM is first imported: it reads them then
        vllm_logger = logging.getLogger("vllm")
        if not vllm_logger.handlers:  # what vLLM logs while importing, before it applies the config above
            vllm_logger.addHandler(logging.FileHandler(self.config.log_path))
            vllm_logger.propagate = False
        started = time.monotonic()
        self._stack = AsyncExitStack()
        try:
            self.engine, app = await self._build(self._stack)
            self.client.app = app
            if not await self.client.healthy():
                raise RuntimeError("the engine is not healthy after start")
            await self.client.warm_up(self.config.served_base_name)
        except Exception as exc:
            await self._teardown()
            cause = tail_line(self.config.log_path, errors_only=True) or f"{type(exc).__name__}: {exc}"
            raise ServiceStartError(f"vllm failed to start: {cause[:300]} [log: {self.config.log_path}]") from exc
        log.info("vLLM ready after %.1fs", time.monotonic() - started)
        if self.on_ready:
            await self.on_ready(self.client)
        self.ready.set()

    async def _build(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        """What `vllm serve` does before it listens: engine client, app, app state, lifespan."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(self.config.argv())
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        usage = UsageContext.OPENAI_API_SERVER

        def create() -> Any:  # blocks until the engine core has loaded the model: not on the event loop
            vllm_config = engine_args.create_engine_config(usage_context=usage)
            return AsyncLLM.from_vllm_config(vllm_config=vllm_config, usage_context=usage,
                                             enable_log_requests=engine_args.enable_log_requests,
                                             disable_log_stats=engine_args.disable_log_stats)

        engine = await asyncio.to_thread(create)
        stack.callback(engine.shutdown)
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        server = _Server(uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False))
        serving = asyncio.create_task(server.serve(), name="vllm-http")
        stack.push_async_callback(_stop_server, server, serving)
        while not server.started:  # also runs vLLM's app lifespan
            if serving.done():
                serving.result()
                raise RuntimeError(f"vLLM's HTTP server did not start on {self.url}")
            await asyncio.sleep(0.05)
        return engine, app

    async def _teardown(self) -> None:
        self.client.app = None
        engine, stack, self._stack, self.engine = self.engine, self._stack, None, None
        if stack is not None:
            try:
                await stack.aclose()
            except Exception:  # a dead engine's shutdown may complain; it is gone either way
                log.exception("engine shutdown")
        if engine is not None:
            # Shut down above. AsyncLLM.__del__ would run shutdown again when the object is finally
            # collected, at interpreter exit, with vLLM's modules already torn down (a traceback).
            engine.shutdown = lambda timeout=None: None

    async def _supervise(self) -> None:
        """Restart a dead engine; traffic waits (503) until every current adapter is back."""
        backoff = 1.0
        while True:
            await asyncio.sleep(1.0)
            if self.engine is not None and not self.engine.errored:
                continue
            self.ready.clear()
            log.error("vLLM engine died (%s); restarting", tail_line(self.config.log_path))
            await self._teardown()
            try:
                await self._launch()
                self.restarts += 1
                backoff = 1.0
            except ServiceStartError as exc:
                log.error("engine restart failed: %s; retrying in %.0fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def stop(self) -> None:
        if self._supervisor:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        self.ready.clear()
        await self._teardown()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the process's signals belong to `clora serve`, not to this server
        yield


async def _stop_server(server: uvicorn.Server, serving: asyncio.Task) -> None:
    server.should_exit = True
    await asyncio.wait([serving], timeout=10)
