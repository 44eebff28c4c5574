"""What the gateway's handlers share: its parts (kept on the app), authentication, the admin
preamble as one dependency, and the request bodies (parsed by `clora.core.http.JsonBody`)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from clora.core.audit import AuditLog
from clora.core.customers import CustomerStore
from clora.core.health import ComponentHealth
from clora.core.http import APIError, Body, JsonBody, bearer, unauthorized
from clora.core.tenant_configs import TenantConfigStore
from clora.core.traces import TraceSigner
from clora.runtime.capture import Capture
from clora.runtime.engine import Engine
from clora.runtime.limits import CustomerLimits, LimitOverride, Limits
from clora.runtime.protocol import ChatRequest, unsupported_fields
from clora.runtime.routing import Router
from clora.wire.admin import (
    CustomerBody,
    EventFate,
    KeyBody,
    OperatorBody,
    PinBody,
    PublishBody,
    ReplayReport,
    RouteBody,
)
from clora.wire.trainer_config import TenantConfig


@dataclass
class GatewayConfig:
    base_model: str
    served_base_name: str = "base"
    max_request_bytes: int = 1 << 20
    admin_key: str | None = None
    upstream_timeout_s: float | None = 600.0  # the engine's answer must start within this (else 504)
    limits: Limits = field(default_factory=Limits)  # per customer (runtime/limits.py)
    fair_share_requests: int = 8  # engine requests shared by competing customers (runtime/fair_share.py)
    max_tokens_cap: int | None = 4096  # a larger max_tokens / max_completion_tokens is a 400


@dataclass
class Gateway:
    """Everything a handler may use; one per app, on `app.state.gateway`."""

    config: GatewayConfig
    customers: CustomerStore
    router: Router
    engine: Engine
    capture: Capture | None
    traces: TraceSigner
    configs: TenantConfigStore | None = None  # trainer configs (the admin API sets them)
    validate_lora: Callable[[int, list[str]], None] | None = None  # raises AdapterRejected
    # Background components shown in /healthz (ingestion...): degraded ones do not make it a 503.
    health_checks: dict[str, Callable[[], ComponentHealth | Awaitable[ComponentHealth]]] = field(default_factory=dict)
    # A customer's replay buffer report (counters, newest records): the feedback stage's, set by
    # the composition root (the gateway does not import the stages above it).
    replay_report: Callable[[str, int], Awaitable[ReplayReport]] | None = None
    # Deletes what the stages above keep of a customer (replay buffer, evals, trainer state);
    # returns counts for the answer. Set by the composition root, like `replay_report`.
    purge_customer: Callable[[str], Awaitable[dict]] | None = None
    # What became of one feedback event (customer, event id), None when unknown: set like `replay_report`.
    event_fate: Callable[[str, str], Awaitable[EventFate | None]] | None = None
    limits: CustomerLimits = field(init=False)
    audit: AuditLog = field(init=False)

    def __post_init__(self) -> None:
        self.limits = CustomerLimits(self.config.limits, self.config.fair_share_requests)
        self.audit = AuditLog(self.customers.redis)

    def refuse_unsupported(self, chat: ChatRequest) -> None:
        """A customer's request: the max_tokens cap, and only the fields that may reach vLLM."""
        unknown = unsupported_fields(chat)
        if unknown:
            raise APIError(400, f"Unsupported parameter `{unknown[0]}`: this server does not forward it.",
                           "unsupported_parameter", unknown[0])
        self.refuse_over_cap(chat)

    def refuse_over_cap(self, chat: ChatRequest) -> None:
        cap = self.config.max_tokens_cap
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(chat, name)
            if cap and value is not None and value > cap:
                raise APIError(400, f"`{name}` is {value}; this server allows at most {cap}.",
                               "max_tokens_exceeded", name)

    def refuse_unsafe_seed(self, seed: int | None) -> None:
        """A `seed` the engine cannot take without crashing (vLLM's CPU engine) is a 400, not an outage."""
        if seed is not None and not self.engine.accepts_seed():
            raise APIError(400, "`seed` is not supported by this server's engine (vLLM's CPU engine crashes on "
                                "seeded requests); leave it out", "unsupported_parameter", "seed")

    def require_engine(self) -> None:
        if not self.engine.is_ready():
            raise APIError(503, "The engine is restarting; retry shortly.", "engine_unavailable",
                           headers={"Retry-After": "5"})

    async def authenticate(self, request: Request) -> str:
        customer = await self.customers.authenticate(bearer(request))
        if customer is None:
            raise unauthorized()
        return customer

    def require_admin(self, request: Request) -> None:
        # Constant time: how long a refusal takes must not tell how much of the key was right.
        if not self.config.admin_key or not hmac.compare_digest(bearer(request).encode(), self.config.admin_key.encode()):
            raise unauthorized()


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway_of)]


@dataclass
class AdminScope:
    gateway: Gateway
    customer: str


async def admin_scope(customer: str, request: Request) -> AdminScope:
    """The admin preamble: the admin key, then a customer that exists."""
    gateway = gateway_of(request)
    gateway.require_admin(request)
    if not await gateway.customers.exists(customer):
        raise APIError(404, f"Customer `{customer}` does not exist.", "customer_not_found")
    return AdminScope(gateway, customer)


def require_admin(request: Request) -> Gateway:
    gateway = gateway_of(request)
    gateway.require_admin(request)
    return gateway


AdminOf = Annotated[AdminScope, Depends(admin_scope)]  # /admin/customers/{customer}/...
Admin = Annotated[Gateway, Depends(require_admin)]  # admin routes about no customer


# -- request bodies --------------------------------------------------------------------------------
def _request_limit(request: Request) -> int:
    return gateway_of(request).config.max_request_bytes


CHAT_BODY = JsonBody(ChatRequest, _request_limit, object_only=True)
PUBLISH_BODY = JsonBody(PublishBody, _request_limit)
ROUTE_BODY = JsonBody(RouteBody, _request_limit)
PIN_BODY = JsonBody(PinBody, _request_limit)
CUSTOMER_BODY = JsonBody(CustomerBody, _request_limit)
LIMITS_BODY = JsonBody(LimitOverride, _request_limit)
KEY_BODY = JsonBody(KeyBody, _request_limit)
OPERATOR_BODY = JsonBody(OperatorBody, _request_limit)
TRAINER_CONFIG_BODY = JsonBody(TenantConfig, _request_limit)
ChatBody = Annotated[Body[ChatRequest], Depends(CHAT_BODY)]
PublishIn = Annotated[Body[PublishBody], Depends(PUBLISH_BODY)]
RouteIn = Annotated[Body[RouteBody], Depends(ROUTE_BODY)]
PinIn = Annotated[Body[PinBody], Depends(PIN_BODY)]
CustomerIn = Annotated[Body[CustomerBody], Depends(CUSTOMER_BODY)]
LimitsIn = Annotated[Body[LimitOverride], Depends(LIMITS_BODY)]
KeyIn = Annotated[Body[KeyBody], Depends(KEY_BODY)]
OperatorIn = Annotated[Body[OperatorBody], Depends(OPERATOR_BODY)]
TrainerConfigIn = Annotated[Body[TenantConfig], Depends(TRAINER_CONFIG_BODY)]
