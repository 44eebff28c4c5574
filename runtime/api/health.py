"""Operations: `GET /healthz` (engine and capture state) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from clora.runtime.api.deps import GatewayDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(gateway: GatewayDep) -> JSONResponse:
    ready = gateway.engine.is_ready()
    body = {"status": "ok" if ready else "degraded", "engine": ready,
            "capture_connected": gateway.capture.connected() if gateway.capture else None}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
