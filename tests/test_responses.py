"""What the client sees vs what capture keeps, on vLLM-shaped payloads (no server needed)."""

from __future__ import annotations

from clora.runtime.responses import ClientWants, StreamAccumulator, for_client
from clora.wire.interactions import captured_choices


def lp(*values: float) -> dict:
    return {"content": [{"token": "t", "logprob": v, "bytes": [], "top_logprobs": []} for v in values]}


def test_non_streaming_capture_and_stripping():
    payload = {"id": "x", "model": "m", "prompt_token_ids": [1, 2],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop", "token_ids": [5, 6], "logprobs": lp(-0.1, -0.2)}]}
    shown = for_client(payload, "trace", "default", ClientWants(logprobs=False, token_ids=False))
    assert shown["id"] == "trace" and shown["model"] == "default"
    assert "prompt_token_ids" not in shown and "token_ids" not in shown["choices"][0]
    assert shown["choices"][0]["logprobs"] is None
    # Capture runs after the client has its answer: the payload it reads is still whole.
    assert payload["id"] == "x" and payload["prompt_token_ids"] == [1, 2]
    choices = captured_choices(payload)
    assert choices[0].token_ids == [5, 6] and choices[0].logprobs == [-0.1, -0.2]
    kept = for_client(payload, "trace", "default", ClientWants(logprobs=True, token_ids=True))
    assert kept["prompt_token_ids"] == [1, 2] and kept["choices"][0]["token_ids"] == [5, 6]
    assert kept["choices"][0]["logprobs"] == lp(-0.1, -0.2)


def test_stream_accumulator_rebuilds_content_tool_calls_and_tokens():
    acc = StreamAccumulator()
    acc.add({"prompt_token_ids": [1, 2, 3], "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    acc.add({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "calc", "arguments": '{"a":'}}]},
        "token_ids": [7, 8], "logprobs": lp(-1.0, -2.0)}]})
    assert not acc.complete()
    acc.add({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]},
                          "token_ids": [9], "logprobs": lp(-3.0), "finish_reason": "tool_calls"}]})
    acc.add({"choices": [], "usage": {"completion_tokens": 3}})
    assert acc.complete() and acc.prompt_token_ids == [1, 2, 3]
    (choice,) = acc.choices()
    assert choice.token_ids == [7, 8, 9] and choice.logprobs == [-1.0, -2.0, -3.0]
    call = choice.message["tool_calls"][0]
    assert call["id"] == "call_1" and call["function"] == {"name": "calc", "arguments": '{"a": 1}'}
    assert choice.finish_reason == "tool_calls"


def test_trace_ids_prove_their_customer():
    from clora.core.traces import TraceSigner

    signer = TraceSigner(b"k" * 32)
    trace = signer.new("acme")
    assert trace.startswith("chatcmpl-") and signer.issued_to(trace, "acme")
    assert not signer.issued_to(trace, "globex")
    assert not TraceSigner(b"j" * 32).issued_to(trace, "acme")  # another deployment's secret
    for forged in ("chatcmpl-", "chatcmpl-" + "0" * 40, trace[:-1] + ("0" if trace[-1] != "0" else "1"), "x" + trace):
        assert not signer.issued_to(forged, "acme")
