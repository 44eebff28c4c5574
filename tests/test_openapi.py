"""The gateway's OpenAPI document describes every body it accepts (what a client generator or a
fuzzer reads), and it is the document the running gateway serves."""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request


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


def test_every_post_and_put_has_a_request_schema(gateway: str):
    doc = httpx.get(f"{gateway}/openapi.json").json()
    writes = [f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops if m in ("post", "put")]
    assert {"POST /v1/chat/completions", "POST /v1/feedback", "POST /admin/customers/{customer}/adapters",
            "POST /admin/customers/{customer}/sample", "PUT /admin/customers/{customer}/route",
            "PUT /admin/customers/{customer}/pins"} <= set(writes)
    assert undocumented_bodies(doc) == []
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
