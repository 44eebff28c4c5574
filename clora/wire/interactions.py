"""Records the runtime emits at its boundaries (Kafka messages), typed with pydantic.

`InteractionRecord` is what the gateway captures per finished request; the feedback pipeline
joins feedback events against it by `trace_id` and the trainer reads its token ids, the
behaviour logprobs (the serving adapter's logprobs of the sampled tokens, as processed for sampling)
and the sampling parameters that processing used (`Sampler`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

SCHEMA_VERSION = 2  # 2: `sampler` (the effective sampling parameters) and processed logprobs



def interaction_key(trace_id: str) -> str:
    """Where ingestion stores an interaction in Redis (the capture outbox's proof it arrived)."""
    return f"clora:interaction:{trace_id}"


# Below this temperature vLLM samples greedily.
GREEDY_BELOW = 1e-5


class Sampler(BaseModel):
    """The sampling parameters an answer was drawn with, defaults filled in: what the trainer needs to
    put its own logits through the processing vLLM applied (`logprobs_mode=processed_logprobs`) and
    so compare like with like.

    vLLM's order: logit bias and penalties, then temperature, min-p, then top-k and top-p. The trainer
    reproduces temperature, top-k and top-p; an answer shaped by anything else (`reproducible()`
    false) gets no importance ratio."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(default=0, description="0: off.")
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: bool = Field(default=False, description="Whether a logit bias was applied.")
    constrained: bool = Field(default=False, description="A grammar (response_format, structured outputs) or a "
                                                         "forced tool choice masked the vocabulary.")

    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def reproducible(self) -> bool:
        """Whether the trainer can recompute the sampling distribution (and so an importance ratio)."""
        return (not self.greedy() and not self.constrained and not self.logit_bias and self.min_p == 0
                and self.presence_penalty == 0 and self.frequency_penalty == 0 and self.repetition_penalty == 1)


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
    logprobs: list[float] = Field(description="Logprob of each sampled token under the serving adapter, after the "
                                              "sampler's processing (temperature, top-k, top-p).")


class InteractionRecord(BaseModel):
    schema_version: int = SCHEMA_VERSION
    trace_id: str = Field(description="Also the record id: consumers deduplicate on it.")
    customer: str
    adapter: str | None = Field(description="Adapter version name served, None for the base model.")
    adapter_version: int | None = None
    base_model: str
    request: CapturedRequest
    sampler: Sampler | None = Field(default=None, description="None: captured before schema 2 (raw logprobs, "
                                                              "sampling unknown).")
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
