"""The gateway against the real stack: the official openai SDK in, vLLM behind, Kafka capture out."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from clora.core.state import trace_secret
from clora.core.traces import TraceSigner
from clora.wire.interactions import InteractionRecord
from tests.helpers import read_topic

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def client_for(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)


def captured(broker: str, topic: str, trace_ids: set[str], timeout_s: float = 30) -> dict[str, InteractionRecord]:
    return read_topic(broker, topic, InteractionRecord.model_validate_json, lambda r: r.trace_id, trace_ids, timeout_s)


def direct_greedy(engine: httpx.Client, model: str, messages: list, max_tokens: int = 12) -> dict:
    resp = engine.post("/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True, "logprobs": True, "top_logprobs": 0})
    resp.raise_for_status()
    return resp.json()


def test_sync_chat_is_captured_with_vllm_token_ids_and_logprobs(gateway, engine, broker, make_customer, stack):
    name, key = make_customer()
    raw = client_for(gateway, key).chat.completions.with_raw_response.create(
        model="default", messages=MESSAGES, max_tokens=12, temperature=0)
    reply = raw.parse()
    trace_id = raw.headers["x-clora-trace-id"]
    assert reply.id == trace_id
    signer = TraceSigner(trace_secret(stack.stack.settings))
    assert signer.issued_to(trace_id, name) and not signer.issued_to(trace_id, name + "x")
    # The client did not ask for logprobs or token ids: none leak into its answer.
    assert reply.choices[0].logprobs is None
    assert "token_ids" not in reply.choices[0].model_extra and "prompt_token_ids" not in reply.model_extra

    record = captured(broker, "clora.interactions", {trace_id})[trace_id]
    direct = direct_greedy(engine, "base", MESSAGES)
    assert record.customer == name and record.adapter is None
    assert record.prompt_token_ids == direct["prompt_token_ids"]
    assert record.choices[0].token_ids == direct["choices"][0]["token_ids"]
    expected_lp = [c["logprob"] for c in direct["choices"][0]["logprobs"]["content"]]
    assert record.choices[0].logprobs == pytest.approx(expected_lp, abs=1e-4)
    assert record.choices[0].message["content"] == reply.choices[0].message.content
    assert record.request.sampling["max_tokens"] == 12 and record.latency_ms > 0


def test_streaming_relays_chunks_and_captures_the_whole_answer(gateway, engine, broker, make_customer):
    _, key = make_customer()
    stream = client_for(gateway, key).chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    trace_id = chunks[0].id
    assert all(c.id == trace_id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)

    record = captured(broker, "clora.interactions", {trace_id})[trace_id]
    direct = direct_greedy(engine, "base", MESSAGES, max_tokens=10)
    assert record.stream and record.choices[0].message["content"] == text
    assert record.prompt_token_ids == direct["prompt_token_ids"]
    assert record.choices[0].token_ids == direct["choices"][0]["token_ids"]
    assert len(record.choices[0].logprobs) == len(record.choices[0].token_ids) == 10


def test_stream_is_captured_even_when_the_client_hangs_up_right_after_done(gateway, broker, make_customer):
    _, key = make_customer()
    trace_ids = set()
    with httpx.Client(timeout=120) as client:
        for _ in range(5):
            with client.stream("POST", f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": "default", "messages": MESSAGES, "max_tokens": 4, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        trace_ids.add(json.loads(line[6:])["id"])
                    if line == "data: [DONE]":
                        break  # closes the connection at once
    assert len(trace_ids) == 5
    assert set(captured(broker, "clora.interactions", trace_ids)) == trace_ids


def test_client_that_asks_for_logprobs_and_token_ids_gets_them(gateway, make_customer):
    _, key = make_customer()
    reply = client_for(gateway, key).chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"return_token_ids": True})
    assert len(reply.choices[0].logprobs.content) == 5
    assert all(len(t.top_logprobs) == 2 for t in reply.choices[0].logprobs.content)
    assert len(reply.choices[0].model_extra["token_ids"]) == 5 and reply.model_extra["prompt_token_ids"]


def test_seed_is_refused_on_the_cpu_engine_which_it_would_crash(gateway, make_customer, admin, engine):
    """vLLM 0.32's CPU worker dies on a seeded request whose sampled token it discards (a prefill
    chunk): "CPU Generator does not use offset", engine core gone. The gateway refuses the field
    instead, on the chat endpoint and on admin sampling, and serving goes on."""
    name, key = make_customer()
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(gateway, key).chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, seed=7)
    assert refused.value.body["param"] == "seed" and "CPU engine" in refused.value.body["message"]
    resp = admin.post(f"/admin/customers/{name}/sample", json={"model": "default", "messages": MESSAGES,
                                                                "max_tokens": 4, "seed": 7})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed"
    assert client_for(gateway, key).chat.completions.create(model="default", messages=MESSAGES, max_tokens=4)


async def test_async_client_concurrent_requests(gateway, make_customer):
    _, key = make_customer()
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)
    replies = await asyncio.gather(*[
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=6, temperature=0)
        for _ in range(8)])
    assert len({r.id for r in replies}) == 8
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: same answer
    await client.close()


def test_tool_call_request_shape_passes_through(gateway, broker, make_customer, tokenizer_dir):
    _, key = make_customer()
    # The random model would fill the JSON grammar's optional whitespace forever: bias it away.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_space = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluate arithmetic", "strict": True,
        "parameters": {"type": "object", "properties": {"op": {"type": "string", "enum": ["add", "mul"]}},
                       "required": ["op"], "additionalProperties": False}}}]
    raw = client_for(gateway, key).chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "What is 2+3?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "calculator"}}, max_tokens=100, temperature=0,
        logit_bias=no_space)
    reply = raw.parse()
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments)["op"] in {"add", "mul"}  # enum: the random model must finish
    trace_id = raw.headers["x-clora-trace-id"]
    record = captured(broker, "clora.interactions", {trace_id})[trace_id]
    assert record.request.tools == tools
    assert record.choices[0].message["tool_calls"][0]["function"]["name"] == "calculator"

    # A follow-up turn carrying the tool call and its result is accepted (multi-turn episodes).
    follow = client_for(gateway, key).chat.completions.create(model="default", max_tokens=5, tools=tools, messages=[
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"}])
    assert follow.choices[0].finish_reason in {"length", "stop", "tool_calls"}


def test_models_lists_only_what_the_caller_may_use(gateway, make_customer, make_adapter, admin):
    owner, owner_key = make_customer()
    other, other_key = make_customer()
    resp = admin.post(f"/admin/customers/{owner}/adapters", json={"path": str(make_adapter(seed=11))})
    assert resp.status_code == 200, resp.text
    version = resp.json()["name"]
    assert {m.id for m in client_for(gateway, owner_key).models.list()} == {"default", version}
    assert {m.id for m in client_for(gateway, other_key).models.list()} == {"default"}


def test_bad_requests_get_openai_style_4xx(gateway, make_customer, make_adapter, admin):
    owner, _ = make_customer()
    _, key = make_customer()
    admin.post(f"/admin/customers/{owner}/adapters", json={"path": str(make_adapter(seed=12))}).raise_for_status()
    foreign = f"{owner}.v1"
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{gateway}/v1/chat/completions"
    good = {"model": "default", "messages": MESSAGES, "max_tokens": 2}

    def check(resp: httpx.Response, status: int) -> dict:
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["message"] and error["type"]
        return error

    check(httpx.post(url, json=good), 401)
    check(httpx.post(url, json=good, headers={"Authorization": "Bearer sk-clora-wrong"}), 401)
    missing = check(httpx.post(url, json={**good, "model": f"{owner}.v999"}, headers=headers), 404)
    stolen = check(httpx.post(url, json={**good, "model": foreign}, headers=headers), 404)
    # Someone else's adapter and a name that does not exist are indistinguishable.
    assert stolen["message"].replace(foreign, "X") == missing["message"].replace(f"{owner}.v999", "X")
    assert check(httpx.post(url, content=b"{not json", headers=headers), 400)["code"] == "invalid_json"
    check(httpx.post(url, json={"model": "default", "messages": []}, headers=headers), 400)
    check(httpx.post(url, json={**good, "temperature": 9}, headers=headers), 400)
    check(httpx.post(url, json={**good, "messages": [{"role": "wizard", "content": "x"}]}, headers=headers), 400)
    check(httpx.post(url, json=[1, 2], headers=headers), 400)
    huge = {**good, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    check(httpx.post(url, json=huge, headers=headers), 413)
    # Over the context window: vLLM's own 400 comes back as ours, not a 500.
    check(httpx.post(url, json={**good, "max_tokens": 5000}, headers=headers), 400)
    check(httpx.get(f"{gateway}/v1/models"), 401)
    check(httpx.post(f"{gateway}/admin/customers/{owner}/adapters", json={"path": "/tmp"}, headers=headers), 401)


def test_health_and_metrics(gateway, make_customer):
    _, key = make_customer()
    client_for(gateway, key).chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert httpx.post(f"{gateway}/v1/chat/completions", json={}).status_code == 401
    health = httpx.get(f"{gateway}/healthz").json()
    assert health["engine"] is True and health["capture_connected"] is True
    assert health["ingestion"]["state"] == "running" and health["ingestion"]["ok"] is True
    assert health["status"] == "ok"
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'clora_requests_total{status="200",stream="false"}' in metrics
    assert 'clora_requests_total{status="401",stream="unknown"}' in metrics
    assert "clora_capture_records_total" in metrics
    assert "clora_ingest_up 1.0" in metrics


def test_candidates_are_callable_only_through_the_admin_api_until_promoted(gateway, make_customer, make_adapter,
                                                                           admin):
    """The promotion gate cannot be bypassed: an undecided or held-back candidate is not the
    customer's to call or to see; a version once served stays callable after a rollback."""
    name, key = make_customer()
    live = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(make_adapter(seed=21))}).json()["name"]
    resp = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(make_adapter(seed=22)), "switch": False})
    assert resp.status_code == 200, resp.text
    candidate = resp.json()["name"]
    headers = {"Authorization": f"Bearer {key}"}
    ask = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}

    def customer_chat(model: str) -> httpx.Response:
        return httpx.post(f"{gateway}/v1/chat/completions", json={**ask, "model": model}, headers=headers, timeout=60)

    missing = customer_chat(f"{name}.v999")
    refused = customer_chat(candidate)
    assert refused.status_code == missing.status_code == 404
    assert refused.json()["error"]["message"].replace(candidate, "X") == \
        missing.json()["error"]["message"].replace(f"{name}.v999", "X")
    assert {m.id for m in client_for(gateway, key).models.list()} == {"default", live}
    sampled = admin.post(f"/admin/customers/{name}/v1/chat/completions", json={**ask, "model": candidate})
    assert sampled.status_code == 200 and sampled.json()["adapter"] == candidate  # the gate's evals still reach it
    listed = {v["name"]: v["promoted"] for v in admin.get(f"/admin/customers/{name}/adapters").json()["versions"]}
    assert listed == {live: True, candidate: False}

    admin.put(f"/admin/customers/{name}/route", json={"adapter": candidate}).raise_for_status()  # promoted
    admin.put(f"/admin/customers/{name}/route", json={"adapter": live}).raise_for_status()  # rolled back
    assert customer_chat(candidate).status_code == 200
    assert {m.id for m in client_for(gateway, key).models.list()} == {"default", live, candidate}


def test_a_version_the_engine_refuses_at_request_time_is_a_503_not_a_500(gateway, make_customer, make_adapter, admin):
    name, key = make_customer()
    resp = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(make_adapter(seed=23)), "switch": False})
    version = resp.json()
    shutil.rmtree(version["path"])  # not loaded yet (a candidate loads on first use); its files are gone
    refused = admin.post(f"/admin/customers/{name}/v1/chat/completions",
                         json={"model": version["name"], "messages": MESSAGES, "max_tokens": 2})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "adapter_unavailable"
    reply = client_for(gateway, key).chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message is not None  # everything else is served as before


def engine_running(engine: httpx.Client) -> float:
    metrics = engine.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_an_engine_slower_than_the_upstream_timeout_is_a_504_and_aborted_there(gateway, engine, stack,
                                                                               make_customer):
    _, key = make_customer()
    config = stack.stack.server.config.app.state.gateway.config
    config.upstream_timeout_s = 0.2
    try:
        resp = httpx.post(f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": "default", "messages": MESSAGES, "max_tokens": 960, "ignore_eos": True})
    finally:
        config.upstream_timeout_s = 600.0
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "upstream_timeout"
    # Aborted in the engine, not left generating its 960 tokens for nobody.
    deadline = time.monotonic() + 1
    while engine_running(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_running(engine) == 0


def test_a_stream_the_client_leaves_is_aborted_in_the_engine(gateway, engine, make_customer):
    _, key = make_customer()
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "default", "messages": MESSAGES, "max_tokens": 960, "ignore_eos": True,
                                 "stream": True}) as resp:
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: {")
                if events == 3:
                    assert engine_running(engine) == 1
                    break  # hangs up with 957 tokens still to come
    deadline = time.monotonic() + 2
    while engine_running(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_running(engine) == 0


@contextmanager
def customer_limits(stack, limits):
    """The running gateway's per-customer limits replaced for the block."""
    from clora.runtime.limits import CustomerLimits

    gateway_obj = stack.stack.server.config.app.state.gateway
    before = gateway_obj.limits
    gateway_obj.limits = CustomerLimits(limits)
    try:
        yield gateway_obj.limits
    finally:
        gateway_obj.limits = before


def chat(gateway: str, key: str, **body) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": "default", "messages": MESSAGES, "max_tokens": 2, **body})


def test_only_allow_listed_extras_reach_the_engine_and_max_tokens_is_capped(gateway, make_customer):
    _, key = make_customer()
    for field, value in (("prompt_logprobs", 5), ("priority", -10), ("chat_template", "{{ 'x' }}"),
                         ("logits_processors", ["x"])):
        resp = chat(gateway, key, **{field: value})
        assert resp.status_code == 400, (field, resp.text)
        assert resp.json()["error"]["code"] == "unsupported_parameter" and resp.json()["error"]["param"] == field
    ok = chat(gateway, key, top_k=5, min_p=0.1, ignore_eos=True, min_tokens=2, stop_token_ids=[7],
              chat_template_kwargs={}, user="u-1")
    assert ok.status_code == 200, ok.text
    over = chat(gateway, key, max_tokens=5000)
    assert over.status_code == 400 and over.json()["error"]["code"] == "max_tokens_exceeded"


def test_a_customer_over_its_concurrency_limit_gets_429_and_others_are_unaffected(gateway, stack, make_customer):
    from clora.runtime.limits import Limits

    _, key = make_customer()
    _, other = make_customer()
    with customer_limits(stack, Limits(max_concurrent=2, requests_per_s=0)) as limits, \
            ThreadPoolExecutor(2) as pool:
        long = [pool.submit(chat, gateway, key, max_tokens=400, ignore_eos=True) for _ in range(2)]
        deadline = time.monotonic() + 30
        while sum(limits.active.values()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = chat(gateway, key)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded" and refused.headers["retry-after"]
        assert chat(gateway, other).status_code == 200  # another customer's slots are its own
        assert all(f.result().status_code == 200 for f in long)
        assert chat(gateway, key).status_code == 200  # slots released when the answers end
        assert limits.active == {}


def test_request_and_token_rates_are_limited_per_customer(gateway, stack, make_customer):
    from clora.runtime.limits import Limits

    _, key = make_customer()
    with customer_limits(stack, Limits(max_concurrent=0, requests_per_s=1)):
        codes = [chat(gateway, key).status_code for _ in range(3)]  # a burst of 2 s worth: 2
        assert codes == [200, 200, 429]
        refused = chat(gateway, key)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    with customer_limits(stack, Limits(max_concurrent=0, requests_per_s=0, tokens_per_min=30)):
        streamed = httpx.post(f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              timeout=120, json={"model": "default", "messages": MESSAGES, "max_tokens": 40,
                                                 "ignore_eos": True, "stream": True})
        assert streamed.status_code == 200  # its prompt and 40 tokens overdraw the 30 tokens/min
        refused = chat(gateway, key)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "token_rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1


def test_a_customer_given_its_own_limit_is_held_to_it_and_others_keep_the_default(gateway, stack, admin,
                                                                                     make_customer):
    name, key = make_customer()
    _, other = make_customer()
    shown = admin.put(f"/admin/customers/{name}/limits", json={"max_concurrent": 1, "requests_per_s": None})
    assert shown.status_code == 200, shown.text
    assert shown.json()["own"] and shown.json()["max_concurrent"] == 1 and shown.json()["requests_per_s"] == 100
    limits = stack.stack.server.config.app.state.gateway.limits
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, gateway, key, max_tokens=400, ignore_eos=True)
        deadline = time.monotonic() + 30
        while limits.active.get(name, 0) < 1:  # its one slot taken by the long request
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = chat(gateway, key)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert chat(gateway, other).status_code == 200
        assert long.result().status_code == 200
    assert admin.put(f"/admin/customers/{name}/limits", json={}).json()["own"] is False  # the defaults again
    assert admin.get(f"/admin/customers/{name}/limits").json()["max_concurrent"] == 64
    assert admin.put(f"/admin/customers/{name}/limits", json={"max_concurrent": -1}).status_code == 400


def test_an_engine_failing_a_request_is_a_503_the_client_retries():
    """A request in flight when the engine dies (the soak: vLLM's app answering 500 while it is torn
    down) is the designed 503 with `Retry-After`, as for a request arriving during the restart; a
    4xx from the engine stays the caller's error."""
    from clora.runtime.api.upstream import upstream_error

    failed = upstream_error(500, json.dumps({"error": {"message": "'State' object has no attribute 'server'"}}))
    assert (failed.status, failed.code, failed.headers) == (503, "engine_error", {"Retry-After": "5"})
    refused = upstream_error(400, json.dumps({"error": {"message": "bad"}}))
    assert refused.status == 400 and not refused.headers
