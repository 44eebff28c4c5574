"""The admin API for customers, their keys and operators, and the audit log of admin actions.
A key is shown once, in the answer that creates it; Redis keeps only its SHA-256."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from clora.core.customers import InvalidName
from clora.core.http import APIError
from clora.runtime.api.deps import (
    CUSTOMER_BODY,
    KEY_BODY,
    LIMITS_BODY,
    OPERATOR_BODY,
    Admin,
    AdminOf,
    CustomerIn,
    KeyIn,
    LimitsIn,
    OperatorIn,
)
from clora.runtime.limits import LimitStore
from clora.wire.admin import (
    AuditEntries,
    CreatedKey,
    CustomerLimits,
    CustomerList,
    DeletedCustomer,
    IssuedKey,
    ListedCustomer,
    ListedOperator,
    OperatorList,
    RevokedKeys,
    RevokedOperator,
)

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/customers")
async def list_customers(gateway: Admin) -> CustomerList:
    store = gateway.customers
    return CustomerList(customers=[ListedCustomer(**c.model_dump(), keys=await store.key_count(c.name))
                                   for c in await store.list()])


@router.post("/customers", status_code=201, openapi_extra=CUSTOMER_BODY.openapi, response_model=CreatedKey)
async def create_customer(gateway: Admin, body: CustomerIn) -> JSONResponse:
    """A new customer and its first API key."""
    try:
        key = await gateway.customers.create(body.value.name)
    except InvalidName as exc:
        status, code = (409, "customer_exists") if "already exists" in str(exc) else (400, "invalid_name")
        raise APIError(status, str(exc), code, "name") from None
    await gateway.audit.record("customer.create", body.value.name)
    return JSONResponse(CreatedKey(name=body.value.name, key=key).model_dump(), status_code=201)


@router.post("/customers/{customer}/keys", status_code=201, openapi_extra=KEY_BODY.openapi, response_model=IssuedKey)
async def issue_key(scope: AdminOf, body: KeyIn) -> JSONResponse:
    """Another API key; with `revoke_existing` the others stop working at once (a rotation)."""
    store = scope.gateway.customers
    revoked = await store.revoke_keys(scope.customer) if body.value.revoke_existing else 0
    key = await store.issue_key(scope.customer)
    await scope.gateway.audit.record("customer.key.issue", scope.customer, revoked=revoked)
    return JSONResponse(IssuedKey(customer=scope.customer, key=key, revoked=revoked).model_dump(), status_code=201)


@router.delete("/customers/{customer}/keys")
async def revoke_keys(scope: AdminOf) -> RevokedKeys:
    """Revoke every key of the customer (its agents get 401 from now on)."""
    revoked = await scope.gateway.customers.revoke_keys(scope.customer)
    await scope.gateway.audit.record("customer.key.revoke", scope.customer, revoked=revoked)
    return RevokedKeys(customer=scope.customer, revoked=revoked)


@router.delete("/customers/{customer}")
async def delete_customer(scope: AdminOf) -> DeletedCustomer:
    """The customer and its data: keys first (its agents get 401 from now on), then its versions
    (unloaded from the engine once their requests end, files deleted), route, trainer config,
    replay buffer, eval history and trainer state. Kafka keeps its records until retention, and
    captured interactions stay in Redis until their TTL (docs/api.md)."""
    gateway = scope.gateway
    revoked = await gateway.customers.revoke_keys(scope.customer)
    versions = await gateway.router.delete_customer(scope.customer)
    if gateway.configs is not None:
        await gateway.configs.delete(scope.customer)
    purged = await gateway.purge_customer(scope.customer) if gateway.purge_customer else {}
    await LimitStore(gateway.customers.redis).delete(scope.customer)
    gateway.limits.set_own(scope.customer, None)
    await gateway.customers.delete(scope.customer)
    await gateway.audit.record("customer.delete", scope.customer, versions=versions, **purged)
    return DeletedCustomer(customer=scope.customer, revoked_keys=revoked, versions=versions, **purged)


@router.get("/customers/{customer}/limits")
async def get_limits(scope: AdminOf) -> CustomerLimits:
    """The limits in force for the customer, and whether they are its own or the defaults."""
    limits = scope.gateway.limits
    return CustomerLimits(customer=scope.customer, own=scope.customer in limits.own,
                          **asdict(limits.for_customer(scope.customer)))


@router.put("/customers/{customer}/limits", openapi_extra=LIMITS_BODY.openapi)
async def set_limits(scope: AdminOf, body: LimitsIn) -> CustomerLimits:
    """The customer's own limits (a null field keeps the default); all null: the defaults again."""
    override = body.value if body.value.model_dump(exclude_none=True) else None
    store = LimitStore(scope.gateway.customers.redis)
    await (store.set(scope.customer, override) if override else store.delete(scope.customer))
    scope.gateway.limits.set_own(scope.customer, override)
    await scope.gateway.audit.record("limits.set", scope.customer, **body.value.model_dump())
    return await get_limits(scope)


@router.get("/operators")
async def list_operators(gateway: Admin) -> OperatorList:
    return OperatorList(operators=[ListedOperator(name=o.name, customers=o.customers)
                                   for o in await gateway.customers.operators()])


@router.post("/operators", status_code=201, openapi_extra=OPERATOR_BODY.openapi, response_model=CreatedKey)
async def create_operator(gateway: Admin, body: OperatorIn) -> JSONResponse:
    """An operator key that may send feedback for the given customers."""
    try:
        key = await gateway.customers.create_operator(body.value.name, body.value.customers)
    except InvalidName as exc:
        status, code = (409, "operator_exists") if "already exists" in str(exc) else (400, "invalid_operator")
        raise APIError(status, str(exc), code) from None
    await gateway.audit.record("operator.create", None, operator=body.value.name, customers=body.value.customers)
    return JSONResponse(CreatedKey(name=body.value.name, key=key).model_dump(), status_code=201)


@router.delete("/operators/{name}")
async def revoke_operator(gateway: Admin, name: str) -> RevokedOperator:
    if not await gateway.customers.revoke_operator(name):
        raise APIError(404, f"Operator `{name}` does not exist.", "operator_not_found")
    await gateway.audit.record("operator.revoke", None, operator=name)
    return RevokedOperator(name=name, revoked=True)


@router.get("/audit")
async def audit_log(gateway: Admin, last: int = Query(50, ge=1, le=1000),
                    customer: str | None = Query(None, max_length=63)) -> AuditEntries:
    """Admin actions, newest first (optionally about one customer)."""
    return AuditEntries(entries=await gateway.audit.recent(last, customer))
