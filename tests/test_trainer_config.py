"""Trainer configs through the admin API: defaults until set, replaced whole, checked against the
engine when set (a shape it cannot serve is a 422 now, not a tenant backed off at every publish)."""

from __future__ import annotations

import httpx

from clora.wire.trainer_config import DEFAULT_TARGETS


def test_defaults_until_set_then_what_was_set(make_customer, admin: httpx.Client):
    name, _ = make_customer("cfg")
    url = f"/admin/customers/{name}/trainer-config"
    default = admin.get(url).json()
    assert default["lr"] == 1e-3 and default["targets"] == list(DEFAULT_TARGETS) and default["gated"] is False
    stored = admin.put(url, json={"lr": 2e-3, "rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "gated": True})
    assert stored.status_code == 200, stored.text
    again = admin.get(url).json()
    assert (again["lr"], again["rank"], again["targets"], again["gated"]) == (2e-3, 8, ["q_proj", "v_proj"], True)
    assert again["group_size"] == default["group_size"]  # a PUT replaces the config; unset fields are defaults


def test_configs_the_engine_cannot_serve_are_refused_when_set(make_customer, admin: httpx.Client):
    name, _ = make_customer("cfg")
    url = f"/admin/customers/{name}/trainer-config"
    too_big = admin.put(url, json={"rank": 64})  # the test engine's max_lora_rank is 16
    assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "invalid_trainer_config"
    assert "max_lora_rank 16" in too_big.json()["error"]["message"]
    unknown = admin.put(url, json={"targets": ["q_proj", "attn_proj"]})
    assert unknown.status_code == 422 and "attn_proj" in unknown.json()["error"]["message"]
    misspelt = admin.put(url, json={"learning_rate": 1e-3})
    assert misspelt.status_code == 400 and misspelt.json()["error"]["param"] == "learning_rate"
    assert admin.get(url).json()["rank"] == 16  # nothing refused was stored


def test_trainer_config_needs_the_admin_key_and_a_customer(make_customer, gateway: str, admin: httpx.Client):
    name, key = make_customer("cfg")
    url = f"{gateway}/admin/customers/{name}/trainer-config"
    assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.put(url, json={}, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert admin.get("/admin/customers/no-such-customer/trainer-config").status_code == 404
