"""The gateway's OpenAPI document describes every body it accepts and every admin answer it gives
(what a client generator or a fuzzer reads), and it is the document the running gateway serves."""

from __future__ import annotations

from pathlib import Path

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI, Request

from clora.core.customers import CustomerStore
from clora.core.traces import TraceSigner
from clora.runtime.adapters import AdapterRegistry
from clora.runtime.gateway import GatewayConfig, create_app
from clora.runtime.routing import Router


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def undocumented_bodies(doc: dict) -> list[str]:
    """POST/PUT operations without a JSON request schema that resolves to something concrete."""
    missing = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if method not in ("post", "put"):
                continue
            schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            try:
                concrete = schema is not None and bool({"properties", "anyOf", "oneOf"} & resolve(doc, schema).keys())
            except KeyError:
                concrete = False
            if not concrete:
                missing.append(f"{method.upper()} {path}")
    return missing


def admin_answers_without_a_schema(doc: dict) -> list[str]:
    """Admin operations whose success answer has no JSON schema with named fields (a bare `dict`)."""
    missing = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items() if path.startswith("/admin") else ():
            answers = [r for code, r in operation.get("responses", {}).items() if code.startswith("2")]
            schemas = [r.get("content", {}).get("application/json", {}).get("schema") for r in answers]
            try:
                named = bool(schemas) and all(s is not None and "properties" in resolve(doc, s) for s in schemas)
            except KeyError:
                named = False
            if not named:
                missing.append(f"{method.upper()} {path}")
    return missing


def offline_app() -> FastAPI:
    """The gateway's app built with no server, engine, broker or Redis: its document needs none
    (the Redis client is never connected)."""
    redis = aioredis.Redis()
    router = Router(AdapterRegistry(redis, Path("/nonexistent")), engine=None)
    return create_app(GatewayConfig(base_model="model"), CustomerStore(redis), router, engine=None, capture=None,
                      traces=TraceSigner(b"0" * 16))


def test_every_admin_endpoint_declares_its_answer():
    doc = offline_app().openapi()
    admin = [f"{m.upper()} {p}" for p, ops in doc["paths"].items() if p.startswith("/admin") for m in ops]
    assert len(admin) >= 22, admin
    assert admin_answers_without_a_schema(doc) == []
    listed = resolve(doc, doc["paths"]["/admin/customers/{customer}/adapters"]["get"]["responses"]["200"]["content"]
                     ["application/json"]["schema"])
    assert {"customer", "current", "versions"} <= listed["properties"].keys()


def test_an_admin_answer_without_a_model_is_reported():
    app = FastAPI()

    @app.get("/admin/raw")
    async def raw() -> dict:
        return {}

    @app.get("/v1/elsewhere")
    async def elsewhere() -> dict:  # not the admin API
        return {}

    assert admin_answers_without_a_schema(app.openapi()) == ["GET /admin/raw"]


def test_every_post_and_put_has_a_request_schema(gateway: str):
    doc = httpx.get(f"{gateway}/openapi.json").json()
    writes = [f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops if m in ("post", "put")]
    assert {"POST /v1/chat/completions", "POST /v1/feedback", "POST /admin/customers/{customer}/adapters",
            "POST /admin/customers/{customer}/sample", "PUT /admin/customers/{customer}/route",
            "PUT /admin/customers/{customer}/pins"} <= set(writes)
    assert undocumented_bodies(doc) == []
    assert admin_answers_without_a_schema(doc) == []  # the served document too
    chat = resolve(doc, doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
                   ["schema"])
    assert {"model", "messages"} <= set(chat["required"]) and chat["properties"]["n"]["maximum"] == 64
    feedback = resolve(doc, doc["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]
                       ["schema"])
    assert len(feedback["anyOf"]) == 2  # one event, or {"events": [...]}


def test_a_body_read_by_hand_without_a_schema_is_reported():
    app = FastAPI()

    @app.post("/raw")
    async def raw(request: Request) -> dict:
        return await request.json()

    assert undocumented_bodies(app.openapi()) == ["POST /raw"]
