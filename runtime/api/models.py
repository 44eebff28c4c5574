"""`GET /v1/models`: `default` (the caller's current version) and the caller's own promoted versions
(candidates the promotion gate has not decided, or held back, are not the customer's to call)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clora.runtime.api.deps import gateway_of

router = APIRouter(tags=["models"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    gateway = gateway_of(request)
    customer = await gateway.authenticate(request)
    current = gateway.router.routes.get(customer)
    owned = [v for v in await gateway.router.registry.versions(customer) if v.name in gateway.router.promoted]
    created = int(current.created_at) if current else 0
    data = [{"id": "default", "object": "model", "created": created, "owned_by": customer,
             "current": current.name if current else None}]
    data += [{"id": v.name, "object": "model", "created": int(v.created_at), "owned_by": customer} for v in owned]
    return {"object": "list", "data": data}
