"""Operations: `GET /healthz` (engine, capture and background components) and `GET /metrics`
(Prometheus). Only an engine that cannot serve makes /healthz a 503 (a load balancer then takes the
replica out); a lagging or restarting ingestion, or a tenant whose training is halted, is reported
as "degraded" with a 200: serving is unaffected, and pulling the replica would not help."""

from __future__ import annotations

import inspect

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from clora.runtime.api.deps import GatewayDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(gateway: GatewayDep) -> JSONResponse:
    ready = gateway.engine.is_ready()
    components = {}
    for name, check in gateway.health_checks.items():
        health = check()
        components[name] = await health if inspect.isawaitable(health) else health
    body = {"status": "ok" if ready and all(c.ok for c in components.values()) else "degraded", "engine": ready,
            "capture_connected": gateway.capture.connected() if gateway.capture else None,
            **{name: c.model_dump() for name, c in components.items()}}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)  # documented as what it is: text, not JSON
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
