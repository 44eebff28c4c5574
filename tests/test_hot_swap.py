"""Adapter versions against the real engine: hot-swap, rollback, more customers than slots."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import threading

import httpx
import openai

from tests.test_gateway import MESSAGES, client_for, direct_greedy


def greedy_ids(gateway: str, key: str, model: str = "default") -> list[int]:
    reply = client_for(gateway, key).chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    return reply.choices[0].model_extra["token_ids"]


def publish(admin: httpx.Client, customer: str, path) -> dict:
    resp = admin.post(f"/admin/customers/{customer}/adapters", json={"path": str(path)})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_hot_swap_changes_output_to_exactly_a_fresh_load(gateway, engine, make_customer, make_adapter, admin):
    name, key = make_customer()
    base = greedy_ids(gateway, key)
    v1 = publish(admin, name, make_adapter(seed=1))
    after_v1 = greedy_ids(gateway, key)
    assert after_v1 != base

    # The same weights loaded fresh into the engine under a brand-new name give the same tokens.
    fresh = f"fresh-{name}"
    engine.post("/v1/load_lora_adapter", json={"lora_name": fresh, "lora_path": v1["path"]}).raise_for_status()
    try:
        assert direct_greedy(engine, fresh, MESSAGES)["choices"][0]["token_ids"] == after_v1
    finally:
        engine.post("/v1/unload_lora_adapter", json={"lora_name": fresh})

    v2 = publish(admin, name, make_adapter(seed=2))
    assert v2["name"] != v1["name"] and v2["version"] == v1["version"] + 1
    after_v2 = greedy_ids(gateway, key)
    assert after_v2 not in (after_v1, base)
    # Old versions stay addressable by their owner (reloaded on demand), and rollback is a switch.
    assert greedy_ids(gateway, key, model=v1["name"]) == after_v1
    admin.put(f"/admin/customers/{name}/route", json={"adapter": v1["name"]}).raise_for_status()
    assert greedy_ids(gateway, key) == after_v1


def test_replaced_version_is_unloaded_from_the_engine(gateway, engine, make_customer, make_adapter, admin):
    name, key = make_customer()
    v1 = publish(admin, name, make_adapter(seed=3))
    greedy_ids(gateway, key)
    v2 = publish(admin, name, make_adapter(seed=4))
    served = {m["id"] for m in engine.get("/v1/models").json()["data"]}
    assert v2["name"] in served and v1["name"] not in served


def test_four_customers_on_two_slots_are_all_served(gateway, make_customer, make_adapter, admin):
    customers = [make_customer("slot") for _ in range(4)]
    expected = {}
    for i, (name, key) in enumerate(customers):
        publish(admin, name, make_adapter(seed=20 + i))
        expected[name] = greedy_ids(gateway, key)
    assert len({tuple(v) for v in expected.values()}) == 4  # four different adapters

    # Interleaved and concurrent: every request answered, each by its own customer's adapter.
    jobs = [(name, key) for _ in range(3) for name, key in customers]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda nk: (nk[0], greedy_ids(gateway, nk[1])), jobs))
    assert all(ids == expected[name] for name, ids in results)


def test_other_customers_keep_flowing_during_swaps(gateway, make_customer, make_adapter, admin):
    steady_name, steady_key = make_customer("steady")
    publish(admin, steady_name, make_adapter(seed=30))
    expected = greedy_ids(gateway, steady_key)
    swapper, _ = make_customer("swapper")
    stop = threading.Event()
    outcomes: list[object] = []

    def traffic() -> None:
        client = client_for(gateway, steady_key)
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=12,
                                                       temperature=0, extra_body={"return_token_ids": True})
                outcomes.append(reply.choices[0].model_extra["token_ids"])
            except openai.APIError as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    for seed in range(40, 44):
        publish(admin, swapper, make_adapter(seed=seed))
    stop.set()
    for t in threads:
        t.join()
    assert outcomes and all(o == expected for o in outcomes), [o for o in outcomes if o != expected][:3]


def test_adapter_that_the_engine_cannot_serve_is_rejected(make_customer, make_adapter, admin, tmp_path):
    name, _ = make_customer()
    too_big = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(make_adapter(seed=5, rank=32))})
    assert too_big.status_code == 422 and "rank" in too_big.json()["error"]["message"]
    not_adapter = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(tmp_path)})
    assert not_adapter.status_code == 422
    assert admin.get(f"/admin/customers/{name}/adapters").json()["versions"] == []


def test_a_publish_retried_with_its_idempotency_key_makes_one_version(make_customer, make_adapter, admin):
    name, _ = make_customer()
    path = str(make_adapter(seed=6))
    first = admin.post(f"/admin/customers/{name}/adapters", json={"path": path}, headers={"Idempotency-Key": "ck-1"})
    again = admin.post(f"/admin/customers/{name}/adapters", json={"path": path}, headers={"Idempotency-Key": "ck-1"})
    other = admin.post(f"/admin/customers/{name}/adapters", json={"path": path}, headers={"Idempotency-Key": "ck-2"})
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json()["name"] == first.json()["name"] != other.json()["name"]
    assert [v["name"] for v in admin.get(f"/admin/customers/{name}/adapters").json()["versions"]] == \
        [first.json()["name"], other.json()["name"]]


def test_an_adapter_the_engine_fails_to_load_registers_no_version(gateway, make_customer, make_adapter, admin,
                                                                  tmp_path):
    """Valid on paper (config, rank, targets), unreadable weights: the engine refuses the load, so
    nothing is registered (recovery could take it as published) and serving goes on."""
    name, key = make_customer()
    broken = tmp_path / "broken"
    shutil.copytree(make_adapter(seed=7), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    refused = admin.post(f"/admin/customers/{name}/adapters", json={"path": str(broken)})
    assert refused.status_code == 422, refused.text
    assert admin.get(f"/admin/customers/{name}/adapters").json() == {"customer": name, "current": None,
                                                                     "versions": []}
    good = publish(admin, name, make_adapter(seed=8))
    assert good["name"] == f"{name}.v2"  # numbers are never reused
    assert greedy_ids(gateway, key)


def test_loads_unloads_and_leases_racing_on_one_version_never_overlap(stack, make_customer, make_adapter, admin):
    """Switches back and forth between two versions while requests lease them: the engine never
    sees two loads/unloads of one name at once, and the router's view of what is loaded is the
    engine's at the end."""
    name, _ = make_customer()
    v1, v2 = (publish(admin, name, make_adapter(seed=s))["name"] for s in (9, 10))
    router = stack.stack.server.config.app.state.gateway.router
    engine = router.engine
    busy: dict[str, int] = {}
    overlaps: list[str] = []

    def watched(call):
        async def run(adapter: str, *args):
            busy[adapter] = busy.get(adapter, 0) + 1
            if busy[adapter] > 1:
                overlaps.append(adapter)
            try:
                await asyncio.sleep(0.01)  # widen the window a racing caller could slip into
                return await call(adapter, *args)
            finally:
                busy[adapter] -= 1
        return run

    async def race() -> set[str]:
        versions = [await router.registry.get(v) for v in (v1, v2)]

        async def lease(version) -> None:
            async with router.lease(version):
                await asyncio.sleep(0.005)

        jobs = []
        for i in range(40):
            jobs.append(router.switch(versions[i % 2]))
            jobs += [lease(versions[(i + 1) % 2]), lease(versions[i % 2])]
        await asyncio.gather(*jobs)
        return set(await engine.served_models())

    engine.load_adapter, engine.unload_adapter = watched(engine.load_adapter), watched(engine.unload_adapter)
    try:
        served = stack.call(race(), timeout_s=120)
    finally:
        del engine.load_adapter, engine.unload_adapter  # the instance attributes: the class's methods again
    assert overlaps == []
    assert {v for v in (v1, v2) if v in served} == {v for v in (v1, v2) if v in router.loaded}
    assert router._locks == {}  # every lock dropped once nobody holds or waits
