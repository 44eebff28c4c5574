"""A fake engine behind the `Engine` protocol (runtime/engine/protocol.py), for logic tests that
need no vLLM: it answers chat with a small completion (or what a test queued), keeps the set of
loaded adapters as vLLM would, and records every call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from clora.runtime.engine import AdapterRejected, ChatAnswer, EngineResponse, EngineUnavailable

BASE = "base"


def error_answer(status: int, message: str) -> ChatAnswer:
    """An error as vLLM's chat handler answers it."""
    return ChatAnswer(status, body=orjson.dumps({"error": {"message": message, "code": status}}))


class FakeEngine:
    def __init__(self, base: str = BASE):
        self.base = base
        self.ready = True
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (what, model or adapter name)
        self.queued: list[ChatAnswer | Exception] = []  # answered first, in order, whatever the model
        self.refuse: set[str] = set()  # adapter names `load_adapter` rejects
        self.delay_s = 0.0

    def is_ready(self) -> bool:
        return self.ready

    def accepts_seed(self) -> bool:
        return True

    async def chat(self, body: dict) -> EngineResponse:
        model = body.get("model", "")
        self.calls.append(("chat", model))
        if not self.ready:
            raise EngineUnavailable("the engine is not running")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.queued:
            answer = self.queued.pop(0)
            if isinstance(answer, Exception):
                raise answer
        elif model != self.base and model not in self.loaded:
            answer = error_answer(404, f"The model `{model}` does not exist.")
        else:
            answer = ChatAnswer(200, payload=completion(model, body))
        return EngineResponse.of(answer)

    async def load_adapter(self, name: str, path: Path) -> None:
        self.calls.append(("load", name))
        if name in self.refuse or not path.exists():
            raise AdapterRejected(f"engine refused adapter {name}: no adapter at {path}")
        self.loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.loaded.discard(name)

    async def healthy(self) -> bool:
        return self.ready

    async def served_models(self) -> list[str]:
        return [self.base, *sorted(self.loaded)]

    def count(self, what: str, name: str | None = None) -> int:
        return sum(1 for w, n in self.calls if w == what and (name is None or n == name))


def completion(model: str, body: dict) -> dict:
    """A one-choice chat completion naming the model that answered, with token ids and logprobs."""
    text = f"answered by {model}"
    tokens = list(range(1, len(text.split()) + 1))
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "prompt_token_ids": [7, 8, 9],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "token_ids": tokens,
                         "logprobs": {"content": [{"token": w, "logprob": -0.5, "top_logprobs": []}
                                                  for w in text.split()]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": len(tokens), "total_tokens": 3 + len(tokens)}}
