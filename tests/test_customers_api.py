"""Customers, keys and operators through the admin API, and the audit log (real gateway and Redis)."""

from __future__ import annotations

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
