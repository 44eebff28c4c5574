"""The vLLM server: started, health-checked, restarted when it dies; the only client of its admin API.

We talk to vLLM over its HTTP API only (no imports of its internals), so a vLLM upgrade is a
version bump, not a patch rebase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from runtime.models import CHAT_TEMPLATE
from runtime.processes import ChildProcess, ServiceStartError, free_port
from runtime.settings import Settings

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
    port: int = 0
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
            model=model, log_dir=log_dir, cache_dir=settings.cache_dir, port=settings.engine_port,
            served_base_name=settings.served_base_name, dtype=settings.dtype,
            max_model_len=settings.max_model_len, max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras, max_lora_rank=settings.max_lora_rank,
            lora_target_modules=settings.lora_target_modules, kv_cache_gib=settings.kv_cache_gib,
            cpu_threads_bind=settings.cpu_threads_bind, enforce_eager=settings.enforce_eager,
            start_timeout_s=settings.engine_start_timeout_s, extra_args=settings.engine_extra_args,
        )

    def argv(self, port: int) -> list[str]:
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_base_name,
            "--host", HOST, "--port", str(port), "--dtype", self.dtype,
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
        return {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(self.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind,
            "VLLM_CACHE_ROOT": str((self.cache_dir / "vllm").resolve()),
            "TORCHINDUCTOR_CACHE_DIR": str((self.cache_dir / "torchinductor").resolve()),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }

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


JSON_HEADERS = {"Content-Type": "application/json"}


class EngineClient:
    """HTTP client for vLLM: inference pass-through and the LoRA admin endpoints.

    aiohttp rather than httpx on this path: it writes a request's headers and body in one send and
    costs about a third of httpx's per-request CPU, which is most of what the gateway adds.
    """

    def __init__(self, base_url: str, timeout_s: float = 600.0, max_connections: int = 512):
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that will use it.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=self.base_url, timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=5.0),
                connector=aiohttp.TCPConnector(limit=self.max_connections, force_close=False))
        return self._session

    async def chat(self, body: dict) -> aiohttp.ClientResponse:
        """POST a chat request; the caller reads (or streams) and releases the response."""
        return await self.session.post("/v1/chat/completions", data=orjson.dumps(body), headers=JSON_HEADERS)

    async def healthy(self) -> bool:
        try:
            async with self.session.get("/health", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def warm_up(self, model: str) -> None:
        """The first request after start pays one-off costs (~10 s on CPU); pay them before traffic."""
        async with self.session.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as resp:
            await resp.read()

    async def load_adapter(self, name: str, path: Path) -> None:
        body = {"lora_name": name, "lora_path": str(path.resolve())}
        async with self.session.post("/v1/load_lora_adapter", json=body) as resp:
            text = await resp.text()
            if resp.status != 200 and "already been loaded" not in text:
                raise AdapterRejected(f"engine refused adapter {name}: {resp.status} {text[:300]}")

    async def unload_adapter(self, name: str) -> None:
        async with self.session.post("/v1/unload_lora_adapter", json={"lora_name": name}) as resp:
            if resp.status not in (200, 404):
                log.warning("unloading %s failed: %s %s", name, resp.status, (await resp.text())[:200])

    async def served_models(self) -> list[str]:
        async with self.session.get("/v1/models") as resp:
            resp.raise_for_status()
            return [m["id"] for m in (await resp.json())["data"]]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


OnReady = Callable[[EngineClient], Awaitable[None]]


class EngineManager:
    """Owns the vLLM process; `ready` is set only while it is healthy and adapters are reloaded."""

    def __init__(self, config: EngineConfig, on_ready: OnReady | None = None):
        self.config = config
        self.on_ready = on_ready
        self.port = config.port or free_port(HOST)
        self.url = f"http://{HOST}:{self.port}"
        self.client = EngineClient(self.url)
        self.ready = asyncio.Event()
        self.restarts = 0
        self.process: ChildProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self.ready.is_set()

    async def start(self) -> None:
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def _launch(self) -> None:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.process = ChildProcess("vllm", self.config.argv(self.port), self.config.log_dir / "vllm.log",
                                    env=self.config.env(), cwd=self.config.log_dir).start()
        started = time.monotonic()
        while not await self.client.healthy():
            if not self.process.alive():
                raise self.process.start_error("starting the engine")
            if time.monotonic() - started > self.config.start_timeout_s:
                self.process.stop()
                raise self.process.start_error(f"not healthy after {self.config.start_timeout_s:.0f}s")
            await asyncio.sleep(0.5)
        await self.client.warm_up(self.config.served_base_name)
        log.info("vLLM ready on %s after %.1fs", self.url, time.monotonic() - started)
        if self.on_ready:
            await self.on_ready(self.client)
        self.ready.set()

    async def _supervise(self) -> None:
        """Restart a dead engine; traffic waits (503) until every current adapter is back."""
        backoff = 1.0
        while True:
            await asyncio.sleep(1.0)
            if self.process is not None and self.process.alive():
                continue
            self.ready.clear()
            log.error("vLLM died (%s); restarting", self.process.last_log_line() if self.process else "")
            if self.process:
                self.process.stop(timeout_s=2.0)
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
        await self.client.aclose()
        if self.process:
            self.process.stop()
