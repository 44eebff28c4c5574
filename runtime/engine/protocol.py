"""What serving sees of the engine: the `Engine` protocol and the shapes that cross it.

The gateway, the router and the admin API call the engine only through `Engine` (chat, adapter
load and unload, health, the served adapters), so another engine (a fake in the unit lane, a
remote replica) plugs in behind it. Nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson


class AdapterRejected(ValueError):
    """The adapter does not fit this engine (rank, modules, files); callers answer 4xx."""


class EngineUnavailable(RuntimeError):
    """The engine is down or restarting; callers answer 503."""


@dataclass
class ChatAnswer:
    """What vLLM's chat handler gave: a whole answer (`payload`), a stream of SSE events
    (`stream`), or an error (`status` and its JSON `body`)."""

    status: int
    payload: dict | None = None
    stream: AsyncIterator[str] | None = None
    body: bytes = b""


ChatCall = Callable[[dict], Awaitable[ChatAnswer]]


class EngineResponse:
    """One answer of vLLM's: status first, then the body as it is produced (streams too)."""

    def __init__(self) -> None:
        self.status = 0
        self.media_type: str | None = "application/json"
        self.started = asyncio.Event()
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.gone = asyncio.Event()  # the caller is done: vLLM sees a disconnect (aborts a stream)
        self.payload: dict | None = None  # a whole answer from the chat handler, already parsed
        self.stream: AsyncIterator[str] | None = None  # a stream from the chat handler

    @classmethod
    def of(cls, answer: ChatAnswer) -> EngineResponse:
        resp = cls()
        resp.status, resp.payload, resp.stream = answer.status, answer.payload, answer.stream
        if answer.stream is None:
            if answer.payload is None:
                resp.chunks.put_nowait(answer.body)
            resp.chunks.put_nowait(None)
        resp.started.set()
        return resp

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body's chunks as they are made (a stream's events arrive as they are made)."""
        if self.stream is not None:
            async for event in self.stream:
                yield event.encode()
            return
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def json(self) -> dict:
        """A whole answer, parsed."""
        return self.payload if self.payload is not None else orjson.loads(await self.read())

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.iter_any()])

    async def text(self) -> str:
        """The whole body as text, for error messages."""
        return (await self.read()).decode(errors="replace")

    def release(self) -> None:
        """The caller is done: the app sees a disconnect, so an unread stream is aborted in vLLM."""
        self.gone.set()

    async def aclose(self) -> None:
        """`release`, and a stream from the chat handler closed: vLLM aborts what is unread."""
        self.release()
        if self.stream is not None and hasattr(self.stream, "aclose"):
            await self.stream.aclose()




class Engine(Protocol):
    """The engine as serving uses it. `chat` raises EngineUnavailable while the engine is down;
    `load_adapter` raises AdapterRejected when the engine refuses one."""

    def is_ready(self) -> bool:
        """Whether traffic may go to the engine (the gateway answers 503 otherwise)."""
        ...

    def accepts_seed(self) -> bool:
        """Whether requests may carry `seed` without harm to the engine."""
        ...

    async def chat(self, body: dict) -> EngineResponse:
        """An OpenAI chat request; the caller reads (or streams) and `aclose`s the answer."""
        ...

    async def load_adapter(self, name: str, path: Path) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def healthy(self) -> bool: ...

    async def served_models(self) -> list[str]:
        """The base model's and every loaded adapter's names."""
        ...
