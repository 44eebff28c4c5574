"""Customers, keys and operators through the admin API, and the audit log (real gateway and Redis)."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.test_feedback_webhook import post, served_trace


def models(gateway: str, key: str) -> int:
    return httpx.get(f"{gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_customers_keys_and_operators_are_managed_through_the_admin_api_and_audited(gateway, admin):
    name = f"api-{uuid.uuid4().hex[:8]}"
    created = admin.post("/admin/customers", json={"name": name})
    assert created.status_code == 201, created.text
    first = created.json()["key"]
    assert models(gateway, first) == 200
    assert admin.post("/admin/customers", json={"name": name}).json()["error"]["code"] == "customer_exists"
    assert admin.post("/admin/customers", json={"name": "Bad Name!"}).status_code == 400
    listed = {c["name"]: c for c in admin.get("/admin/customers").json()["customers"]}
    assert listed[name]["keys"] == 1
    assert httpx.get(f"{gateway}/admin/customers", headers={"Authorization": f"Bearer {first}"}).status_code == 401

    # Rotation: the new key works, the old one stops at once (not after the auth cache's 10 s).
    rotated = admin.post(f"/admin/customers/{name}/keys", json={"revoke_existing": True})
    assert rotated.status_code == 201 and rotated.json()["revoked"] == 1
    second = rotated.json()["key"]
    assert models(gateway, second) == 200 and models(gateway, first) == 401
    trace = served_trace(gateway, second)

    operator = f"ops-{uuid.uuid4().hex[:6]}"
    op_key = admin.post("/admin/operators", json={"name": operator, "customers": [name]}).json()["key"]
    assert post(gateway, op_key, {"trace_id": trace, "rating": "up"}).status_code == 202
    assert admin.post("/admin/operators", json={"name": operator, "customers": [name]}).status_code == 409
    assert admin.post("/admin/operators", json={"name": "x-" + operator, "customers": ["nobody-here"]}
                      ).status_code == 400
    shown = {o["name"]: o for o in admin.get("/admin/operators").json()["operators"]}
    assert shown[operator] == {"name": operator, "customers": [name]}  # never its key or digest
    assert admin.delete(f"/admin/operators/{operator}").status_code == 200
    assert admin.delete(f"/admin/operators/{operator}").status_code == 404
    assert post(gateway, op_key, {"trace_id": trace, "rating": "up"}).status_code == 401

    assert admin.delete(f"/admin/customers/{name}/keys").json()["revoked"] == 1
    assert models(gateway, second) == 401
    assert admin.post("/admin/customers/nobody-here/keys", json={}).status_code == 404

    actions = [e["action"] for e in admin.get("/admin/audit", params={"customer": name}).json()["entries"]]
    assert actions == ["customer.key.revoke", "customer.key.issue", "customer.create"]
    recent = admin.get("/admin/audit", params={"last": 10}).json()["entries"]
    assert [e["detail"].get("operator") for e in recent if e["action"].startswith("operator.")][:2] == [operator,
                                                                                                         operator]


def test_deleting_a_customer_removes_its_keys_versions_and_data(gateway, engine, stack, admin, make_adapter,
                                                                 sync_redis):
    from clora.evals.suites import EvalSuite

    name = f"gone-{uuid.uuid4().hex[:8]}"
    key = admin.post("/admin/customers", json={"name": name}).json()["key"]
    version = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(make_adapter(seed=11))}).json()
    assert version["name"] in {m["id"] for m in engine.get("/v1/models").json()["data"]}
    trace = served_trace(gateway, key)
    assert post(gateway, key, {"trace_id": trace, "rating": "up"}).status_code == 202
    assert admin.put(f"/admin/customers/{name}/trainer-config", json={"lr": 0.002}).status_code == 200
    sync_redis.hset("clora:eval:suites", name, EvalSuite(environment="token-range:0-100").model_dump_json())
    sync_redis.hset("clora:eval:scores", f"{name}/{version['name']}|abc", "{}")
    trainer_state = stack.stack.settings.trainer_dir / name
    trainer_state.mkdir(parents=True)
    (trainer_state / "checkpoint").write_text("x")
    deadline = time.monotonic() + 60
    while admin.get(f"/admin/customers/{name}/replay").json()["stats"]["size"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.3)

    deleted = admin.delete(f"/admin/customers/{name}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"customer": name, "revoked_keys": 1, "versions": [version["name"]],
                              "replay_records": 1, "eval_scores": 1}
    assert models(gateway, key) == 401
    assert admin.get(f"/admin/customers/{name}/adapters").status_code == 404
    assert version["name"] not in {m["id"] for m in engine.get("/v1/models").json()["data"]}
    assert not (stack.stack.settings.adapters_dir / name).exists() and not trainer_state.exists()
    left = [k.decode() for k in sync_redis.scan_iter(match=f"*{name}*")]
    assert left == [], left  # nothing in Redis names it (captured interactions are keyed by trace)
    assert sync_redis.hget("clora:eval:suites", name) is None and sync_redis.hget("clora:trainer:config", name) is None
    assert admin.get("/admin/audit", params={"customer": name, "last": 1}).json()["entries"][0]["action"] == \
        "customer.delete"
    assert admin.delete(f"/admin/customers/{name}").status_code == 404
