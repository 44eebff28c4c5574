"""Every endpoint x every way another customer (or an operator of other customers) may try to reach
a customer's data: refused exactly as if the data did not exist, or as not allowed, leaking nothing."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from clora.core.customers import CustomerStore
from tests.test_feedback_webhook import post, served_trace
from tests.test_gateway import MESSAGES


def chat(gateway: str, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": MESSAGES, "max_tokens": 2})


def admin_body(template: str, served: str) -> dict:
    """A well-formed body for the route, so that a refusal can only come from the caller's key."""
    tail = template.rsplit("/", 1)[-1]
    return {"adapters": {"path": "/nonexistent"}, "sample": {"model": "default", "messages": MESSAGES},
            "completions": {"model": served, "messages": MESSAGES}, "route": {"adapter": served},
            "pins": {"pin": [served]}, "trainer-config": {"lr": 0.5}, "limits": {"max_concurrent": 1},
            }.get(tail, {"name": "x"})


def admin_routes(stack, victim: str, served: str) -> list[tuple[str, str, dict | None]]:
    """(method, path, body) for every operation under /admin in the server's OpenAPI document, with
    the victim (or an operator name) in its path."""
    routes = []
    for template, operations in stack.stack.server.config.app.openapi()["paths"].items():
        if not template.startswith("/admin"):
            continue
        path = template.replace("{customer}", victim).replace("{name}", "ops").replace("{event_id}", "ev-1")
        assert "{" not in path, f"a new path parameter in {template}: give it a value here"
        for method in operations:
            body = admin_body(template, served) if method in ("post", "put") else None
            routes.append((method.upper(), path, body))
    assert len(routes) >= 20 and ("PUT", f"/admin/customers/{victim}/limits", {"max_concurrent": 1}) in routes
    assert ("GET", "/admin/audit", None) in routes and ("DELETE", f"/admin/customers/{victim}", None) in routes
    return routes


def same_refusal(resp: httpx.Response, like: httpx.Response, secret: str, stand_in: str) -> None:
    """`resp` (about the victim's data) is indistinguishable from `like` (about data that does not
    exist, named `stand_in` where the attempt named `secret`)."""
    assert resp.status_code == like.status_code, (resp.text, like.text)
    assert resp.text.replace(secret, stand_in) == like.text


def test_no_customer_or_operator_reaches_another_customers_data(gateway, stack, make_customer, make_adapter, admin,
                                                                redis_url):
    victim, victim_key = make_customer("victim")
    attacker, attacker_key = make_customer("attacker")

    async def operator_of_attacker() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await CustomerStore(client).create_operator("ops", [attacker])
        finally:
            await client.aclose()
    operator_key = stack.call(operator_of_attacker())

    served = admin.post(f"/admin/customers/{victim}/adapters", json={"path": str(make_adapter(seed=5))}).json()["name"]
    candidate = admin.post(f"/admin/customers/{victim}/adapters",
                           json={"path": str(make_adapter(seed=6)), "switch": False}).json()["name"]
    victim_trace = served_trace(gateway, victim_key)
    attacker_trace = served_trace(gateway, attacker_key)

    for key in (attacker_key, operator_key):
        # Chat: the victim's served version and its candidate, like a version that never existed.
        for name in (served, candidate):
            fake = f"{victim}.v99"
            same_refusal(chat(gateway, key, name), chat(gateway, key, fake), name, fake)
        # Feedback on the victim's trace, like on a trace never issued (a batch is all or nothing).
        fake_trace = victim_trace[:-4] + "0000"
        same_refusal(post(gateway, key, {"trace_id": victim_trace, "rating": "up"}),
                     post(gateway, key, {"trace_id": fake_trace, "rating": "up"}), victim_trace, fake_trace)
        mixed = post(gateway, key, {"events": [{"trace_id": attacker_trace, "rating": "up"},
                                               {"trace_id": victim_trace, "rating": "down"}]})
        assert mixed.status_code == 404 and victim not in mixed.text
        # Every admin route the server documents, about the victim or about nobody: not allowed,
        # before any lookup (a new route is in this list the moment it exists).
        for method, path, body in admin_routes(stack, victim, served):
            resp = httpx.request(method, f"{gateway}{path}", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})
            nobody = httpx.request(method, f"{gateway}{path.replace(victim, 'nobody-at-all')}", json=body,
                                   timeout=60, headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 401, (method, path, resp.status_code, resp.text)
            assert resp.text == nobody.text and victim not in resp.text and served not in resp.text

    # The attacker's own listings show nothing of the victim.
    listed = httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {attacker_key}"}).json()
    assert [m["id"] for m in listed["data"]] == ["default"]
    # The victim itself cannot call its candidate before the gate promotes it; its served version it can.
    same_refusal(chat(gateway, victim_key, candidate), chat(gateway, victim_key, f"{victim}.v99"), candidate,
                 f"{victim}.v99")
    assert chat(gateway, victim_key, served).status_code == 200
    # Nothing the attempts did changed the victim's state.
    state = admin.get(f"/admin/customers/{victim}/adapters").json()
    assert state["current"] == served and [v["name"] for v in state["versions"]] == [served, candidate]
    assert admin.get(f"/admin/customers/{victim}/trainer-config").json()["lr"] != 0.5
