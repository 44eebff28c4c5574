"""The chat request body as the gateway validates it. Fields it does not declare reach vLLM only
if they are in FORWARDED_EXTRAS (customers' requests; the admin API's callers are trusted)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clora.wire.interactions import Sampler


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=64)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    return_token_ids: bool | None = None
    seed: int | None = None



# vLLM's extra request fields a customer may send: the OpenAI ones the model above leaves to
# vLLM, and the sampling, decoding-constraint and chat-template extras agents and RL clients use.
# Not forwarded: what costs the server far more than its tokens (`prompt_logprobs`,
# `use_beam_search`, `best_of`), what reaches past the request (`priority`, `request_id`,
# `kv_transfer_params`, `vllm_xargs`, `logits_processors`, `mm_processor_kwargs`) and a
# caller-supplied `chat_template` (code run by the server's template engine).
FORWARDED_EXTRAS = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "stop", "response_format", "user", "metadata", "store",
    "parallel_tool_calls", "reasoning_effort", "service_tier",
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "bad_words", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_whitespace_pattern", "echo", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "chat_template_kwargs", "documents", "return_tokens_as_token_ids", "cache_salt",
})


def unsupported_fields(chat: ChatRequest) -> list[str]:
    """The request's fields that are neither declared nor in FORWARDED_EXTRAS."""
    return sorted(set(chat.model_extra or {}) - FORWARDED_EXTRAS)


# Fields that are not sampling parameters, left out of the captured `sampling` dict.
NON_SAMPLING = frozenset({"model", "messages", "stream", "stream_options", "tools", "tool_choice",
                          "return_token_ids"})


# Request fields through which vLLM masks the vocabulary (a grammar, a whitelist, a ban).
_CONSTRAINING = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "allowed_token_ids", "bad_words")


def sampler_of(chat: ChatRequest, raw: dict[str, Any]) -> Sampler:
    """The sampling parameters vLLM will use for this request, its defaults filled in (the engine
    runs with `--generation-config vllm`, so a model's own generation config changes none)."""
    def number(name: str, default: float) -> float:
        value = raw.get(name)
        return default if value is None else float(value)

    response_format = raw.get("response_format") if isinstance(raw.get("response_format"), dict) else {}
    forced_tool = chat.tool_choice == "required" or isinstance(chat.tool_choice, dict)
    constrained = (forced_tool or response_format.get("type", "text") != "text"
                   or any(raw.get(name) for name in _CONSTRAINING) or bool(raw.get("min_tokens")))
    return Sampler(
        temperature=1.0 if chat.temperature is None else chat.temperature,
        top_p=1.0 if chat.top_p is None else chat.top_p,
        top_k=max(0, int(number("top_k", 0))), min_p=number("min_p", 0.0),
        presence_penalty=number("presence_penalty", 0.0), frequency_penalty=number("frequency_penalty", 0.0),
        repetition_penalty=number("repetition_penalty", 1.0), logit_bias=bool(raw.get("logit_bias")),
        constrained=constrained)
