"""Records the runtime emits at its boundaries (Kafka messages), typed with pydantic.

`InteractionRecord` is what the gateway captures per finished request; the feedback pipeline
joins feedback events against it by `trace_id` and the trainer reads its token ids and the
behaviour logprobs (the serving adapter's logprobs of the sampled tokens).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1


class CapturedRequest(BaseModel):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    sampling: dict[str, Any] = Field(default_factory=dict, description="Every other request field.")


class CapturedChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]
    finish_reason: str | None = None
    token_ids: list[int]
    logprobs: list[float] = Field(description="Logprob of each sampled token under the serving adapter.")


class InteractionRecord(BaseModel):
    schema_version: int = SCHEMA_VERSION
    trace_id: str = Field(description="Also the record id: consumers deduplicate on it.")
    customer: str
    adapter: str | None = Field(description="Adapter version name served, None for the base model.")
    adapter_version: int | None = None
    base_model: str
    request: CapturedRequest
    prompt_token_ids: list[int]
    choices: list[CapturedChoice]
    stream: bool = False
    latency_ms: float
    created_at: float = Field(description="Unix time the request arrived.")


def logprob_values(logprobs: dict | None) -> list[float]:
    """The sampled tokens' logprobs from an OpenAI `logprobs` object."""
    return [item["logprob"] for item in (logprobs or {}).get("content") or []]


def captured_choices(response: dict[str, Any]) -> list[CapturedChoice]:
    """The choices of a vLLM chat response (asked with token ids and logprobs) as captured."""
    return [
        CapturedChoice(index=c.get("index", 0), message=c.get("message") or {},
                       finish_reason=c.get("finish_reason"), token_ids=c.get("token_ids") or [],
                       logprobs=logprob_values(c.get("logprobs")))
        for c in response.get("choices", [])
    ]
