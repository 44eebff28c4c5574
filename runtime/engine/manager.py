"""The vLLM engine: hosted in this process, health-checked, restarted when it dies.

vLLM's OpenAI server is two parts: a frontend (HTTP, chat templates, tokenising, detokenising,
the OpenAI JSON) and an engine core process that schedules and runs the model. We run the
frontend inside the gateway's process and call its ASGI app directly, without a socket: the
gateway -> vLLM HTTP hop cost ~0.7 ms of the ~2.9 ms the gateway used to add per request (2
cores); chat requests go straight to the app's chat handler (`chat_call`), as its route would
call it, errors mapped as its exception handlers map them. The engine core stays a child process, as in `vllm serve`; when it dies the frontend is
rebuilt. We use vLLM's own app building blocks and its OpenAI routes, so requests behave exactly as
against `vllm serve` with the same arguments. Nothing else reaches the app: no port is open. Only
in diagnosis mode (`CLORA_ENGINE_DIAGNOSIS_HTTP`) is it also served as is on a loopback port
(`url`, no key, as `vllm serve` would) for the benchmarks' straight-to-vLLM path.

This is the only module of clora that imports vLLM in our process (tests/test_vllm_boundary.py;
the grouped LoRA plugin, `plugin.py`/`punica.py`, runs inside vLLM's): its API is used below its
HTTP surface, so a vLLM upgrade should need changes in this package only. What the engine is
started with is in `config.py`; how its app is called, in `client.py`. Serving sees this class
through the `Engine` protocol (`protocol.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import uvicorn

from clora.core.processes import ServiceStartError, free_port, tail_line
from clora.runtime.engine.client import EngineClient
from clora.runtime.engine.config import HOST, EngineConfig
from clora.runtime.engine.protocol import ChatAnswer, ChatCall, EngineResponse

log = logging.getLogger("clora.engine")

OnReady = Callable[[], Awaitable[None]]


class EngineManager:
    """Owns the engine; `ready` is set only while it is healthy and adapters are reloaded."""

    def __init__(self, config: EngineConfig, on_ready: OnReady | None = None):
        self.config = config
        self.on_ready = on_ready
        self.client = EngineClient()
        self.port = free_port(HOST) if config.diagnosis_http else None
        self.url = f"http://{HOST}:{self.port}" if self.port else None  # diagnosis mode only
        self.ready = asyncio.Event()
        self.restarts = 0
        self.engine: Any = None  # vLLM's AsyncLLM
        self._stack: AsyncExitStack | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        """Whether traffic may go to the engine (the gateway answers 503 otherwise)."""
        return self.ready.is_set()

    def accepts_seed(self) -> bool:
        """Whether requests may carry `seed`. Not on vLLM 0.32's CPU engine: a seeded request whose
        sampled token is discarded (a prefill chunk) makes the worker rewind its generator with
        `set_offset`, which CPU generators refuse ("CPU Generator does not use offset"), and the
        engine core dies: any customer could take serving down with one field."""
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()

    async def chat(self, body: dict) -> EngineResponse:
        return await self.client.chat(body)

    async def load_adapter(self, name: str, path: Path) -> None:
        await self.client.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.client.unload_adapter(name)

    async def healthy(self) -> bool:
        return await self.client.healthy()

    async def served_models(self) -> list[str]:
        return await self.client.served_models()

    def engine_core_pids(self) -> list[int]:
        """The engine core process(es): what dies when the engine crashes."""
        manager = getattr(getattr(getattr(self.engine, "engine_core", None), "resources", None), "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", [])] if manager else []

    async def start(self) -> None:
        """Start the engine (raises ServiceStartError with a one-line cause), then supervise it."""
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def _launch(self) -> None:
        """Build, check and warm up the engine; `ready` only after `on_ready` (adapters reloaded)."""
        self._prepare_vllm_environment()
        started = time.monotonic()
        self._stack = AsyncExitStack()
        try:
            self.engine, app = await self._build(self._stack)
            self.client.app, self.client.chat_call = app, chat_call(app)
            if not await self.client.healthy():
                raise RuntimeError("the engine is not healthy after start")
            await self._warm_up()
        except Exception as exc:
            await self._teardown()
            cause = tail_line(self.config.log_path, errors_only=True) or f"{type(exc).__name__}: {exc}"
            raise ServiceStartError(f"vllm failed to start: {cause[:300]} [log: {self.config.log_path}]") from exc
        log.info("vLLM ready after %.1fs", time.monotonic() - started)
        if self.on_ready:
            await self.on_ready()
        self.ready.set()

    def _prepare_vllm_environment(self) -> None:
        """vLLM's settings and log file, in place before vLLM is first imported."""
        os.environ.update(self.config.env())  # before vLLM is first imported: it reads them then
        vllm_logger = logging.getLogger("vllm")
        if not vllm_logger.handlers:  # what vLLM logs while importing, before it applies the config above
            vllm_logger.addHandler(logging.FileHandler(self.config.log_path))
            vllm_logger.propagate = False

    async def _build(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        """What `vllm serve` does before it listens: engine client, app, app state, lifespan.

        vLLM is imported here, on the event loop's thread and after `_prepare_vllm_environment`."""
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
        if self.config.diagnosis_http:
            await self._serve_loopback(app, stack)
        else:  # vLLM's app lifespan, which its uvicorn would run
            await stack.enter_async_context(app.router.lifespan_context(app))
        return engine, app

    async def _serve_loopback(self, app: Any, stack: AsyncExitStack) -> None:
        """vLLM's app as is on `url` (diagnosis mode), for the benchmarks' straight-to-vLLM path."""
        server = _Server(uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False))
        serving = asyncio.create_task(server.serve(), name="vllm-http")
        stack.push_async_callback(_stop_server, server, serving)
        while not server.started:  # also runs vLLM's app lifespan
            if serving.done():
                serving.result()
                raise RuntimeError(f"vLLM's HTTP server did not start on {self.url}")
            await asyncio.sleep(0.05)

    async def _warm_up(self) -> None:
        """The first request after start pays one-off costs (~10 s on CPU); pay them before traffic."""
        resp = await self.client.chat({"model": self.config.served_base_name,
                                       "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        try:
            await resp.read()
        finally:
            await resp.aclose()

    async def _teardown(self) -> None:
        """Stop the loopback server and the engine; the client answers EngineUnavailable from now on."""
        self.client.app = self.client.chat_call = None
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
        """Stop supervising, then tear the engine down (not restarted again)."""
        if self._supervisor:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        self.ready.clear()
        await self._teardown()


def chat_call(app: Any) -> ChatCall:
    """vLLM's chat handler called as its `/v1/chat/completions` route calls it, without the app
    around it: no routing, middleware, JSON encoding of the answer and parsing it back. Errors
    become the status and body the app's exception handlers would answer."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    serving = app.state.openai_serving_chat

    async def call(body: dict) -> ChatAnswer:
        try:
            result = await serving.create_chat_completion(ChatCompletionRequest.model_validate(body), None)
        except ValidationError as exc:  # the route's body validation (a 400, as its handler answers)
            result = create_error_response(f"invalid request: {exc.errors(include_url=False, include_input=False)}")
        except Exception as exc:  # noqa: BLE001 - the app's exception handlers: every error is an answer
            result = create_error_response(exc)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # vLLM aborted the request and answered "Client disconnected", swallowing the
            # cancellation (a timeout's, the client's): it goes on to whoever cancelled.
            raise asyncio.CancelledError
        if isinstance(result, ErrorResponse):
            return ChatAnswer(result.error.code, body=result.model_dump_json().encode())
        if isinstance(result, ChatCompletionResponse):
            return ChatAnswer(200, payload=result.model_dump())
        return ChatAnswer(200, stream=result)

    return call


class _Server(uvicorn.Server):
    """uvicorn for the loopback port, without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self):  # the process's signals belong to `clora serve`, not to this server
        yield


async def _stop_server(server: uvicorn.Server, serving: asyncio.Task) -> None:
    """Ask the loopback server to exit and wait for it, at most 10 s: a stop is never held up for long."""
    server.should_exit = True
    await asyncio.wait([serving], timeout=10)
