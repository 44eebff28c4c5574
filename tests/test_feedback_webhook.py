"""The feedback webhook on the real stack: broker-acknowledged 202s, ownership, operators, 4xx."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis.asyncio as aioredis

from clora.core.customers import CustomerStore
from clora.core.http import APIError
from clora.core.processes import free_port
from clora.feedback.webhook import FeedbackPublisher
from clora.wire.feedback import FeedbackMessage, FeedbackPost
from tests.helpers import read_topic
from tests.test_gateway import MESSAGES, client_for

TOPIC = "clora.feedback"


def served_trace(gateway: str, key: str) -> str:
    raw = client_for(gateway, key).chat.completions.with_raw_response.create(
        model="default", messages=MESSAGES, max_tokens=2)
    return raw.headers["x-clora-trace-id"]


def feedback_messages(broker: str, event_ids: set[str], timeout_s: float = 30) -> dict[str, FeedbackMessage]:
    """event id -> the event as ingestion reads it off the topic (one post per request and customer)."""
    return read_topic(broker, TOPIC, lambda v: FeedbackPost.model_validate_json(v).messages(),
                      lambda m: m.event.event_id, event_ids, timeout_s, many=True)


def post(gateway: str, key: str | None, body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(f"{gateway}/v1/feedback", content=body, headers=headers, timeout=30)
    return httpx.post(f"{gateway}/v1/feedback", json=body, headers=headers, timeout=30)


def test_feedback_is_on_the_topic_when_202_comes_back(gateway, broker, make_customer):
    name, key = make_customer()
    trace = served_trace(gateway, key)
    single = post(gateway, key, {"trace_id": trace, "rating": "up", "event_id": "ev-single-" + name})
    assert single.status_code == 202, single.text
    batch = post(gateway, key, {"events": [
        {"trace_id": trace, "reward": -0.5},
        {"trace_id": trace, "correction": {"role": "assistant", "content": "Better answer."}, "source": "operator"}]})
    assert batch.status_code == 202 and batch.json()["accepted"] == 2
    ids = {"ev-single-" + name, *batch.json()["event_ids"]}
    got = feedback_messages(broker, ids)
    assert got.keys() == ids
    assert all(m.customer == name and m.submitted_by == "customer" for m in got.values())
    assert got["ev-single-" + name].event.rating == "up"


def test_foreign_trace_is_indistinguishable_from_a_missing_one(gateway, make_customer):
    _, owner_key = make_customer()
    _, other_key = make_customer()
    trace = served_trace(gateway, owner_key)
    foreign = post(gateway, other_key, {"trace_id": trace, "rating": "down"})
    missing = post(gateway, other_key, {"trace_id": "chatcmpl-" + "0" * 40, "rating": "down"})
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "trace_not_found"


def test_operator_keys_are_scoped_to_their_customers(gateway, broker, make_customer, stack, redis_url):
    a, a_key = make_customer()
    b, b_key = make_customer()
    c, c_key = make_customer()

    async def create_operator() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await CustomerStore(client).create_operator("support", [a, b])
        finally:
            await client.aclose()

    operator_key = stack.call(create_operator())
    accepted = post(gateway, operator_key, {"events": [
        {"trace_id": served_trace(gateway, a_key), "rating": "up", "source": "operator"},
        {"trace_id": served_trace(gateway, b_key), "rating": "down", "source": "operator"}]})
    assert accepted.status_code == 202, accepted.text
    got = feedback_messages(broker, set(accepted.json()["event_ids"]))
    assert sorted(m.customer for m in got.values()) == sorted([a, b])
    assert {m.submitted_by for m in got.values()} == {"operator:support"}
    assert post(gateway, operator_key, {"trace_id": served_trace(gateway, c_key), "rating": "up"}).status_code == 404


def test_bad_feedback_gets_clear_4xx(gateway, make_customer):
    _, key = make_customer()
    trace = served_trace(gateway, key)
    assert post(gateway, None, {"trace_id": trace, "rating": "up"}).status_code == 401
    assert post(gateway, "sk-clora-op-nope", {"trace_id": trace, "rating": "up"}).status_code == 401
    for body in (b"{oops", {"trace_id": trace}, {"trace_id": trace, "reward": 3}, {"trace_id": trace, "rating": "meh"},
                 {"trace_id": trace, "rating": "up", "extra": 1}, {"events": []},
                 {"trace_id": trace, "correction": {"role": "assistant", "content": ""}}):
        resp = post(gateway, key, body)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["message"]
    huge = {"trace_id": trace, "comment": "x" * 3000, "rating": "up"}
    assert post(gateway, key, {"events": [huge] * 400}).status_code == 413


def test_rate_limit_answers_429_with_retry_after(gateway, make_customer):
    _, key = make_customer()
    trace = served_trace(gateway, key)
    statuses = []
    for _ in range(3):  # burst 2000, refill 20/s (tests' settings): the third batch of 1000 is over it
        resp = post(gateway, key, {"events": [{"trace_id": trace, "rating": "up"}] * 1000})
        statuses.append(resp.status_code)
    assert statuses[:2] == [202, 202] and statuses[2] == 429
    assert int(resp.headers["retry-after"]) >= 1


async def test_broker_down_is_a_503_not_a_lost_event():
    publisher = FeedbackPublisher(f"127.0.0.1:{free_port()}", TOPIC, timeout_s=2)
    with pytest.raises(APIError) as info:
        await asyncio.wait_for(publisher.publish([]), timeout=60)
    assert info.value.status == 503 and "Retry-After" in info.value.headers


async def test_a_broker_dying_with_posts_in_flight_is_a_503_and_leaves_no_sender_behind(tmp_path):
    """The soak's one undesigned 5xx: the broker SIGKILLed while a post waited for its
    acknowledgement; dropping the producer raised (kafka-python flushes before closing and gives
    up while records are pending) and the webhook answered 500."""
    from clora.core.services import start_broker
    from clora.wire.feedback import FeedbackEvent

    broker = start_broker(tmp_path / "broker", port=free_port())
    publisher = FeedbackPublisher(broker.url, TOPIC, timeout_s=1)

    def one_post(n: int) -> list[tuple[FeedbackPost, str]]:
        post = FeedbackPost(id=f"p{n}", customer="acme", submitted_by="customer", received_at=time.time(),
                            events=[FeedbackEvent(trace_id="t", rating="up", event_id=f"e{n}")])
        return [(post, post.model_dump_json())]

    try:
        await publisher.publish(one_post(1))  # connected, metadata known: the next send is only buffered
        producer = publisher._producer
    finally:
        broker.stop()
    with pytest.raises(APIError) as info:
        await asyncio.wait_for(publisher.publish(one_post(2)), timeout=30)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "5"
    assert publisher._producer is None and not producer._sender.is_alive()


def test_the_admin_replay_report_shows_what_reached_the_buffer(gateway, make_customer, admin):
    name, key = make_customer()
    trace = served_trace(gateway, key)
    accepted = post(gateway, key, {"events": [{"trace_id": trace, "rating": "up"}, {"trace_id": trace, "reward": -0.5}]})
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 60
    while (report := admin.get(f"/admin/customers/{name}/replay", params={"newest": 5}).json())["stats"]["size"] < 2:
        assert time.monotonic() < deadline, (report, admin.get("/healthz").json().get("ingestion"))
        time.sleep(0.3)
    assert report["stats"]["by_kind"] == {"rating": 1, "reward": 1} and report["stats"]["capacity"] > 0
    assert {e["event_id"] for e in report["newest"]} == set(accepted.json()["event_ids"])
    assert all(e["trace_id"] == trace and e["consumed_by"] == [] and e["ingested_at"] for e in report["newest"])
    assert (report["stats"]["waiting"], report["stats"]["dead_lettered"]) == (0, 0)
    # Each event's fate, by its id: in the buffer (no version has trained on it yet).
    for event_id in accepted.json()["event_ids"]:
        fate = admin.get(f"/admin/customers/{name}/feedback/{event_id}").json()
        assert (fate["state"], fate["trace_id"], fate["trained_by"]) == ("in_buffer", trace, []), fate
    unknown = admin.get(f"/admin/customers/{name}/feedback/no-such-event")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "event_not_found"
    assert len(admin.get(f"/admin/customers/{name}/replay", params={"newest": 1}).json()["newest"]) == 1
    assert admin.get(f"/admin/customers/{name}/replay", params={"newest": 1000}).status_code == 400
    assert admin.get("/admin/customers/nobody-here/replay").status_code == 404
    assert httpx.get(f"{gateway}/admin/customers/{name}/replay", headers={"Authorization": f"Bearer {key}"}
                     ).status_code == 401


def test_a_requests_events_go_out_as_one_post_per_customer_each_under_the_size_limit():
    from clora.feedback.webhook import MAX_POST_BYTES, posts_of
    from clora.wire.feedback import FeedbackEvent, parse_feedback_value

    small = [("a", FeedbackEvent(trace_id=f"t{i}", rating="up", event_id=f"a{i}")) for i in range(3)]
    other = [("b", FeedbackEvent(trace_id="t9", reward=0.5, event_id="b0"))]
    big = [("c", FeedbackEvent(trace_id=f"t{i}", comment="x" * 4000, event_id=f"c{i}")) for i in range(150)]
    posts = posts_of([small[0], *other, *small[1:], *big], "customer", 1.0)
    by_customer: dict[str, list[str]] = {}
    for post, value in posts:
        assert len(value) <= MAX_POST_BYTES and value == post.model_dump_json()
        parsed = parse_feedback_value(value.encode())
        assert parsed.id == post.id and parsed.customer == post.customer
        by_customer.setdefault(post.customer, []).extend(event.event_id for event in parsed.events)
    assert [p.customer for p, _ in posts[:2]] == ["a", "b"] and len(posts) > 3  # c's 600 KB split
    assert by_customer == {"a": ["a0", "a1", "a2"], "b": ["b0"], "c": [f"c{i}" for i in range(150)]}
    assert len({p.id for p, _ in posts}) == len(posts)


async def test_redis_down_is_a_503_with_retry_after_not_a_500(tmp_path):
    """Redis restarting (killed, its append-only file replaying) is an outage of a dependency: the
    key cannot be checked, and the caller is told to retry (503 `redis_unavailable`, Retry-After),
    not handed a 500 as if its request were at fault."""
    import signal

    from fastapi import FastAPI

    from clora.core.http import install_error_handlers
    from clora.core.services import start_redis
    from clora.core.traces import TraceSigner
    from clora.feedback.webhook import WebhookLimits, mount_feedback

    valkey = start_redis(tmp_path / "data", tmp_path)
    client = aioredis.Redis.from_url(valkey.url, socket_timeout=2)
    app = FastAPI()
    install_error_handlers(app)
    mount_feedback(app, CustomerStore(client), TraceSigner(b"s" * 32), FeedbackPublisher("127.0.0.1:1", TOPIC),
                   WebhookLimits())
    valkey.process.proc.send_signal(signal.SIGKILL)
    valkey.process.proc.wait()
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            resp = await http.post("/v1/feedback", headers={"Authorization": "Bearer sk-clora-never-seen"},
                                   json={"trace_id": "t", "rating": "up"})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "5" and resp.json()["error"]["code"] == "redis_unavailable"
    finally:
        await client.aclose()
        valkey.stop()
