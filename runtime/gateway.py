"""The gateway: one FastAPI app for customers' agents (OpenAI chat, models), operations (health,
metrics) and the admin API, one router per resource (`runtime/api/`). The feedback webhook's
router is mounted into the same app by the composition root (`clora.stack`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from clora.core.customers import CustomerStore
from clora.core.health import ComponentHealth
from clora.core.http import document_bodies, install_error_handlers
from clora.core.tenant_configs import TenantConfigStore
from clora.core.traces import TraceSigner
from clora.runtime.api import admin, chat, health, models
from clora.runtime.api.customers import router as customers_router
from clora.runtime.api.deps import Gateway, GatewayConfig
from clora.runtime.capture import Capture
from clora.runtime.engine import Engine
from clora.runtime.routing import Router
from clora.wire.admin import EventFate, ReplayReport

__all__ = ["GatewayConfig", "create_app"]


def create_app(config: GatewayConfig, customers: CustomerStore, router: Router, engine: Engine,
               capture: Capture | None, traces: TraceSigner, configs: TenantConfigStore | None = None,
               validate_lora: Callable[[int, list[str]], None] | None = None,
               health_checks: dict[str, Callable[[], ComponentHealth | Awaitable[ComponentHealth]]] | None = None,
               replay_report: Callable[[str, int], Awaitable[ReplayReport]] | None = None,
               purge_customer: Callable[[str], Awaitable[dict]] | None = None,
               event_fate: Callable[[str, str], Awaitable[EventFate | None]] | None = None) -> FastAPI:
    app = FastAPI(title="clora gateway", docs_url=None, redoc_url=None)
    app.state.gateway = Gateway(config, customers, router, engine, capture, traces, configs, validate_lora,
                                health_checks or {}, replay_report, purge_customer, event_fate)
    install_error_handlers(app)
    document_bodies(app)
    for api_router in (chat.router, models.router, health.router, admin.router, customers_router):
        app.include_router(api_router)
    return app
