"""Property-based fuzzing of the gateway's OpenAPI document (schemathesis, bounded examples per
operation) against the real stack: no 5xx, no hang, every answer of the declared content type
and, where the document declares its schema, matching it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.slow
EXAMPLES = 20


@pytest.fixture(scope="module")
def api_schema(gateway, stack):
    return schemathesis.openapi.from_dict(stack.stack.server.config.app.openapi())


@pytest.fixture(scope="module")
def customer_key(stack, redis_url):
    import redis.asyncio as aioredis

    from clora.core.customers import CustomerStore

    async def create() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await CustomerStore(client).create("fuzz")
        finally:
            await client.aclose()
    return stack.call(create())


def test_no_server_errors_and_answers_as_documented(api_schema, gateway, customer_key):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/feedback", "/v1/models",
                                              "/admin/customers/{customer}/adapters"}
    for operation in operations:
        key = ADMIN_KEY if operation.path.startswith("/admin") else customer_key

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            if isinstance(case.body, dict):  # bound the engine's work per example (n x max_tokens on one core)
                for field, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
                    if isinstance(case.body.get(field), int) and case.body[field] > cap:
                        case.body[field] = cap
            case.call_and_validate(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                   checks=[not_a_server_error, content_type_conformance,
                                           response_schema_conformance])
        fuzz()
