"""What the gateway does to vLLM's answers: keep token ids and logprobs for capture, and hand the
client only what it asked for. Pure functions over JSON dicts, so they are tested without servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clora.wire.interactions import CapturedChoice, logprob_values


@dataclass(frozen=True)
class ClientWants:
    logprobs: bool
    token_ids: bool


def for_client(payload: dict[str, Any], trace_id: str, model: str, wants: ClientWants) -> dict[str, Any]:
    """A copy of a response or stream chunk for the client: our trace id, our model name, nothing
    extra. `payload` itself is left whole, so capture can read it after the client has its answer."""
    out = dict(payload, id=trace_id, model=model)
    if not wants.token_ids:
        out.pop("prompt_token_ids", None)
    if not (wants.token_ids and wants.logprobs):
        out["choices"] = [_choice_for_client(c, wants) for c in payload.get("choices", [])]
    return out


def _choice_for_client(choice: dict[str, Any], wants: ClientWants) -> dict[str, Any]:
    out = dict(choice)
    if not wants.token_ids:
        out.pop("token_ids", None)
    if not wants.logprobs:
        out["logprobs"] = None
    return out


@dataclass
class _ChoiceState:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class StreamAccumulator:
    """Rebuilds the full answer (message, token ids, logprobs) from a stream of chunks."""

    def __init__(self) -> None:
        self.prompt_token_ids: list[int] = []
        self._choices: dict[int, _ChoiceState] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        if chunk.get("prompt_token_ids"):
            self.prompt_token_ids = chunk["prompt_token_ids"]
        for choice in chunk.get("choices", []):
            state = self._choices.setdefault(choice.get("index", 0), _ChoiceState())
            delta = choice.get("delta") or {}
            if delta.get("role"):
                state.role = delta["role"]
            if delta.get("content"):
                state.content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                merged = state.tool_calls.setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    merged["id"] = call["id"]
                function = call.get("function") or {}
                merged["function"]["name"] += function.get("name") or ""
                merged["function"]["arguments"] += function.get("arguments") or ""
            state.token_ids.extend(choice.get("token_ids") or [])
            state.logprobs.extend(logprob_values(choice.get("logprobs")))
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]

    def tokens(self) -> int:
        """Prompt and sampled tokens so far."""
        return len(self.prompt_token_ids) + sum(len(s.token_ids) for s in self._choices.values())

    def complete(self) -> bool:
        return bool(self._choices) and all(s.finish_reason for s in self._choices.values())

    def choices(self) -> list[CapturedChoice]:
        out = []
        for index, state in sorted(self._choices.items()):
            message: dict[str, Any] = {"role": state.role, "content": "".join(state.content) or None}
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[i] for i in sorted(state.tool_calls)]
            out.append(CapturedChoice(index=index, message=message, finish_reason=state.finish_reason,
                                      token_ids=state.token_ids, logprobs=state.logprobs))
        return out
