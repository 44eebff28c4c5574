"""vLLM's OpenAI frontend called in-process, without a socket.

The gateway -> vLLM HTTP hop cost ~0.7 ms of the ~2.9 ms the gateway used to add per request (2
cores), so the gateway calls the app object directly (ASGI) for the LoRA admin endpoints and
health, and chat requests go one level lower still: straight to vLLM's chat handler
(`ChatCall`), past the app's routing, middleware and JSON round trip (~1 ms of Python per
request on 2 cores). This module knows only the ASGI protocol and the shapes of the answers, not
vLLM itself: the app and the chat call are handed in by the engine manager (`manager.py`), which
builds them and sets them to None while the engine is down.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson

from clora.runtime.engine.config import HOST
from clora.runtime.engine.protocol import AdapterRejected, ChatCall, EngineResponse, EngineUnavailable

log = logging.getLogger("clora.engine")


def _scope(method: str, path: str, body: bytes) -> dict:
    """The ASGI scope of a JSON request from the loopback address, as vLLM's app would get it."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": (HOST, 0), "server": (HOST, 0)}


class _Exchange:
    """One ASGI call's channels: the request body goes in once, the answer goes to `resp`."""

    def __init__(self, path: str, body: bytes) -> None:
        self.path = path
        self.body = body
        self.resp = EngineResponse()
        self.delivered = False

    async def receive(self) -> dict:
        """The body, then (once the caller released the response) a disconnect."""
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.resp.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        """The app's status and body chunks, into the response as they come."""
        resp = self.resp
        if message["type"] == "http.response.start":
            resp.status = message["status"]
            resp.media_type = dict(message.get("headers") or []).get(b"content-type", b"").decode() or None
            resp.started.set()
        elif message["type"] == "http.response.body":
            if message.get("body"):
                resp.chunks.put_nowait(message["body"])
            if not message.get("more_body"):
                resp.chunks.put_nowait(None)

    def finished(self, task: asyncio.Task) -> None:
        """The app returned or raised: whoever waits for the status or the body is let go."""
        if not task.cancelled() and task.exception() is not None and not self.resp.started.is_set():
            log.error("engine app failed on %s: %r", self.path, task.exception())
        self.resp.started.set()
        self.resp.chunks.put_nowait(None)  # an app that ended without a final body chunk


class EngineClient:
    """vLLM's OpenAI app called in-process (ASGI): inference and the LoRA admin endpoints.

    `app` and `chat_call` are None while the engine is down; calls then raise EngineUnavailable."""

    def __init__(self) -> None:
        self.app: Any = None
        self.chat_call: ChatCall | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> EngineResponse:
        """Start a request; returns once the status is known, while the body may still be coming."""
        app = self.app
        if app is None:
            raise EngineUnavailable("the engine is not running")
        exchange = _Exchange(path, body)
        task = asyncio.get_running_loop().create_task(app(_scope(method, path, body), exchange.receive, exchange.send))
        task.add_done_callback(exchange.finished)
        try:
            await exchange.resp.started.wait()
        except BaseException:  # the caller gave up (timeout, its client left): vLLM sees a disconnect, aborts
            exchange.resp.release()
            raise
        if exchange.resp.status == 0:
            raise EngineUnavailable("the engine failed the request without an answer")
        return exchange.resp

    async def chat(self, body: dict) -> EngineResponse:
        """A chat request, to vLLM's chat handler; the caller reads (or streams) and `aclose`s the
        response. Cancelling the wait aborts the request in vLLM (it is awaited in this task)."""
        chat_call = self.chat_call
        if chat_call is None:
            raise EngineUnavailable("the engine is not running")
        return EngineResponse.of(await chat_call(body))

    async def _json(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """A request read to its end and released: the admin endpoints' shape."""
        resp = await self.request(method, path, orjson.dumps(body) if body is not None else b"")
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    async def healthy(self) -> bool:
        """vLLM's own health check; a down engine is simply not healthy."""
        try:
            return (await self._json("GET", "/health"))[0] == 200
        except EngineUnavailable:
            return False

    async def load_adapter(self, name: str, path: Path) -> None:
        """Register an adapter version under its name; loading one twice is not an error."""
        status, text = await self._json("POST", "/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": str(path.resolve())})
        if status != 200 and b"already been loaded" not in text:
            raise AdapterRejected(f"engine refused adapter {name}: {status} {text[:300].decode(errors='replace')}")

    async def unload_adapter(self, name: str) -> None:
        """Drop an adapter version; failures are logged only (it is unused either way)."""
        try:
            status, text = await self._json("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except EngineUnavailable:
            return  # a restarted engine has no adapters loaded
        if status not in (200, 404):
            log.warning("unloading %s failed: %s %s", name, status, text[:200])

    async def served_models(self) -> list[str]:
        """The base model's and every loaded adapter's names, as vLLM lists them."""
        status, text = await self._json("GET", "/v1/models")
        if status != 200:
            raise EngineUnavailable(f"listing models failed: {status}")
        return [m["id"] for m in orjson.loads(text)["data"]]

    async def aclose(self) -> None:
        """Forget the app: later calls answer EngineUnavailable."""
        self.app = None
        self.chat_call = None
