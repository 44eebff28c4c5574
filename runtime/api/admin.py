"""The admin API (bearer `CLORA_ADMIN_KEY`): adapter versions, routes, pins, uncaptured sampling,
load. The trainer, the eval job and the CLI reach serving only through here
(`clora.core.admin_client`), because the gateway owns the routing table and the engine."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from clora.core.halts import TrainingHalts
from clora.core.http import APIError, model_not_found
from clora.core.tenant_configs import TenantConfigStore
from clora.runtime.api.deps import (
    CHAT_BODY,
    PIN_BODY,
    PUBLISH_BODY,
    ROUTE_BODY,
    TRAINER_CONFIG_BODY,
    Admin,
    AdminOf,
    AdminScope,
    ChatBody,
    PinIn,
    PublishIn,
    RouteIn,
    TrainerConfigIn,
)
from clora.runtime.api.upstream import send_upstream
from clora.runtime.engine import AdapterRejected
from clora.runtime.routing import ModelNotFound
from clora.wire.admin import (
    AdapterVersion,
    CustomerVersions,
    EventFate,
    ListedVersion,
    Load,
    Pins,
    Published,
    ReplayReport,
    SampledCompletion,
    ServedBase,
)
from clora.wire.trainer_config import TenantConfig

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/customers/{customer}/adapters", openapi_extra=PUBLISH_BODY.openapi)
async def publish_adapter(scope: AdminOf, body: PublishIn, idempotency_key: Annotated[
        str | None, Header(max_length=200, description="A retry with the same key (say, after a lost response) "
                                                        "returns the version the first request made, for a day.")] = None
                          ) -> Published:
    """Publish a PEFT adapter directory as the customer's next version (served now, or a candidate);
    registered only once the engine has loaded it."""
    scope.gateway.require_engine()
    started = time.perf_counter()
    try:
        version = await scope.gateway.router.publish(scope.customer, Path(body.value.path), body.value.origin,
                                                     switch=body.value.switch, idempotency_key=idempotency_key)
    except AdapterRejected as exc:
        raise APIError(422, str(exc), "adapter_rejected") from None
    await scope.gateway.audit.record("adapter.publish", scope.customer, version=version.name, origin=body.value.origin,
                                     switch=body.value.switch)
    return Published(**version.model_dump(), swap_ms=(time.perf_counter() - started) * 1000)


@router.post("/customers/{customer}/sample", openapi_extra=CHAT_BODY.openapi, response_model=SampledCompletion)
@router.post("/customers/{customer}/v1/chat/completions", openapi_extra=CHAT_BODY.openapi,  # for the openai SDK
             response_model=SampledCompletion)
async def sample(scope: AdminOf, body: ChatBody) -> JSONResponse:
    """For the trainer and evals: completions under one of the customer's adapters (`default` =
    its current one; the base model by its served name) with token ids and sampled-token
    logprobs; not captured, but leased like any request, so a swap meanwhile cannot unload the
    version being sampled. Answered as vLLM gave it (not re-validated: its fields pass through)."""
    gateway, chat = scope.gateway, body.value
    if chat.stream:
        raise APIError(400, "Sampling does not stream.", "invalid_request", "stream")
    base = gateway.config.served_base_name
    try:  # the base model by name too: evals compare against it
        version = (None if chat.model == base
                   else await gateway.router.resolve(scope.customer, chat.model, candidates=True))
    except ModelNotFound:
        raise model_not_found(chat.model) from None
    gateway.require_engine()
    gateway.refuse_unsafe_seed(chat.seed)
    upstream = dict(body.raw, model=version.name if version else base, return_token_ids=True, logprobs=True,
                    top_logprobs=0)
    async with AsyncExitStack() as stack:
        resp = await send_upstream(stack, gateway.router, gateway.engine, version, upstream,
                                   gateway.config.upstream_timeout_s)
        payload = await resp.json()
    return JSONResponse({**payload, "adapter": version.name if version else None})


@router.put("/customers/{customer}/route", openapi_extra=ROUTE_BODY.openapi)
async def set_route(scope: AdminOf, body: RouteIn) -> AdapterVersion:
    """Serve one of the customer's versions from now on (promote, roll back)."""
    scope.gateway.require_engine()
    registry = scope.gateway.router.registry
    version = await registry.get(body.value.adapter)
    if version is None or version.customer != scope.customer:
        raise model_not_found(body.value.adapter)
    await scope.gateway.router.switch(version)
    await scope.gateway.audit.record("route.set", scope.customer, version=version.name)
    return version


@router.delete("/customers/{customer}/route")
async def clear_route(scope: AdminOf) -> ServedBase:
    """Serve the base model to the customer again."""
    await scope.gateway.router.serve_base(scope.customer)
    await scope.gateway.audit.record("route.clear", scope.customer)
    return ServedBase(customer=scope.customer)


@router.put("/customers/{customer}/pins", openapi_extra=PIN_BODY.openapi)
async def set_pins(scope: AdminOf, body: PinIn) -> Pins:
    """Keep versions through pruning whatever their age (the promotion gate pins rollback targets)."""
    registry = scope.gateway.router.registry
    for name in body.value.pin:
        version = await registry.get(name)
        if version is None or version.customer != scope.customer:
            raise model_not_found(name)
    await registry.pin(scope.customer, body.value.unpin, keep=False)
    await registry.pin(scope.customer, body.value.pin)
    await scope.gateway.audit.record("pins.set", scope.customer, pin=body.value.pin, unpin=body.value.unpin)
    return Pins(customer=scope.customer, pinned=await registry.pinned(scope.customer))


@router.get("/customers/{customer}/adapters")
async def customer_adapters(scope: AdminOf) -> CustomerVersions:
    """The customer's versions, oldest first (`promoted`: served at some time, so callable by the
    customer by name), and the one served now."""
    router = scope.gateway.router
    current = router.routes.get(scope.customer)
    versions = await router.registry.versions(scope.customer)
    return CustomerVersions(customer=scope.customer, current=current.name if current else None,
                            versions=[ListedVersion(**v.model_dump(), promoted=v.name in router.promoted)
                                      for v in versions])


@router.get("/customers/{customer}/replay")
async def customer_replay(scope: AdminOf, newest: int = Query(10, ge=0, le=100)) -> ReplayReport:
    """The customer's replay buffer: size, capacity, records pushed, duplicates, evicted, consumed
    and quarantined (moved out by the trainer: logprob gap over the bound), by kind; feedback
    `waiting` for its interaction and `dead_lettered` by ingestion; the `newest`
    records with the versions whose steps trained on them."""
    if scope.gateway.replay_report is None:
        raise APIError(404, "This gateway has no replay buffers attached.", "replay_unavailable")
    return await scope.gateway.replay_report(scope.customer, newest)


@router.get("/customers/{customer}/feedback/{event_id}")
async def feedback_fate(scope: AdminOf, event_id: str) -> EventFate:
    """What became of one feedback event: `accepted` (not yet handled by ingestion), `waiting` (for
    its interaction), `in_buffer`, `trained` (`trained_by`: the versions whose steps used it),
    `quarantined` or `dead` (`reason`, `at`), `evicted` (stored, then pushed out by newer records)."""
    if scope.gateway.event_fate is None:
        raise APIError(404, "This gateway has no feedback pipeline attached.", "replay_unavailable")
    fate = await scope.gateway.event_fate(scope.customer, event_id)
    if fate is None:
        raise APIError(404, f"No feedback event {event_id!r} is known for this customer (never accepted, or "
                            "forgotten: applied ids are kept a week).", "event_not_found")
    return fate


@router.get("/customers/{customer}/trainer-config")
async def get_trainer_config(scope: AdminOf) -> TenantConfig:
    """The customer's training configuration (the defaults until one is set)."""
    configs = _configs(scope)
    return await configs.get(scope.customer) or TenantConfig()


@router.put("/customers/{customer}/trainer-config", openapi_extra=TRAINER_CONFIG_BODY.openapi)
async def set_trainer_config(scope: AdminOf, body: TrainerConfigIn) -> TenantConfig:
    """Replace the customer's training configuration; one whose adapter shape the engine cannot
    serve is refused now (422) instead of failing every publish later."""
    config = body.value
    if scope.gateway.validate_lora is not None:
        try:
            scope.gateway.validate_lora(config.rank, config.targets)
        except AdapterRejected as exc:
            raise APIError(422, f"The engine cannot serve this adapter shape: {exc}", "invalid_trainer_config",
                           "targets" if "target" in str(exc) else "rank") from None
    await _configs(scope).set(scope.customer, config)
    await scope.gateway.audit.record("trainer_config.set", scope.customer, config=config.model_dump())
    if await TrainingHalts(_configs(scope).redis).resume(scope.customer):  # the operator's fix: try again
        await scope.gateway.audit.record("training.resumed", scope.customer)
    return config


def _configs(scope: AdminScope) -> TenantConfigStore:
    if scope.gateway.configs is None:
        raise APIError(503, "Trainer configs are not kept by this gateway.", "not_configured")
    return scope.gateway.configs


@router.get("/load")
async def load(gateway: Admin) -> Load:
    """How busy serving is: the trainer yields the machine when this is high."""
    return Load(requests_in_flight=gateway.router.requests_in_flight(), engine_ready=gateway.engine.is_ready())
