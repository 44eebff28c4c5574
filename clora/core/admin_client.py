"""The gateway's admin API over HTTP: how the trainer and the eval job see the running runtime.

Sampling goes through the gateway (not straight to vLLM) so that it runs under a lease on the
version it samples, like any request, and is not captured as customer traffic. Publishing goes
through it so that the gateway's routing table switches atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from clora.wire.admin import (
    AdapterVersion,
    CreatedKey,
    CustomerList,
    CustomerVersions,
    IssuedKey,
    ListedCustomer,
    Load,
    Pins,
    Published,
    SampledCompletion,
    ServedBase,
)
from clora.wire.interactions import CapturedChoice, captured_choices
from clora.wire.trainer_config import TenantConfig


@dataclass
class Sampled:
    adapter: str | None  # version that produced the samples (None = base model)
    prompt_token_ids: list[int]
    choices: list[CapturedChoice]


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (429, 502, 503, 504)
    return isinstance(exc, httpx.TransportError)


_retrying = retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(5),
                  wait=wait_exponential(multiplier=0.5, max=8), reraise=True)


class RuntimeClient:
    def __init__(self, gateway_url: str, admin_key: str, timeout_s: float = 300.0):
        self.http = httpx.AsyncClient(base_url=gateway_url, headers={"Authorization": f"Bearer {admin_key}"},
                                      timeout=timeout_s)

    async def close(self) -> None:
        await self.http.aclose()

    @_retrying
    async def sample(self, customer: str, messages: list[dict[str, Any]], *, n: int, max_tokens: int,
                     temperature: float, model: str = "default", **extra: Any) -> Sampled:
        resp = await self.http.post(f"/admin/customers/{customer}/sample", json={
            "model": model, "messages": messages, "n": n, "max_tokens": max_tokens, "temperature": temperature,
            **extra})
        resp.raise_for_status()
        answer = SampledCompletion.model_validate_json(resp.content)
        return Sampled(answer.adapter, answer.prompt_token_ids or [], captured_choices(answer.model_dump()))

    @_retrying
    async def publish(self, customer: str, adapter_dir: Path, origin: str, switch: bool = True,
                      idempotency_key: str | None = None) -> Published:
        """Retried on transport errors; with an `idempotency_key` a retry after a lost response
        returns the version the first attempt made instead of a duplicate."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        resp = await self.http.post(f"/admin/customers/{customer}/adapters", headers=headers,
                                    json={"path": str(adapter_dir.resolve()), "origin": origin, "switch": switch})
        resp.raise_for_status()
        return Published.model_validate_json(resp.content)

    @_retrying
    async def versions(self, customer: str) -> CustomerVersions:
        resp = await self.http.get(f"/admin/customers/{customer}/adapters")
        resp.raise_for_status()
        return CustomerVersions.model_validate_json(resp.content)

    @_retrying
    async def route(self, customer: str, adapter: str | None) -> AdapterVersion | ServedBase:
        """Serve `adapter` to the customer from now on (None: the base model)."""
        if adapter is None:
            resp = await self.http.delete(f"/admin/customers/{customer}/route")
            resp.raise_for_status()
            return ServedBase.model_validate_json(resp.content)
        resp = await self.http.put(f"/admin/customers/{customer}/route", json={"adapter": adapter})
        resp.raise_for_status()
        return AdapterVersion.model_validate_json(resp.content)

    @_retrying
    async def pin(self, customer: str, pin: list[str], unpin: list[str] = ()) -> list[str]:
        """Keep `pin` through version pruning, release `unpin`; returns the customer's pinned versions."""
        resp = await self.http.put(f"/admin/customers/{customer}/pins", json={"pin": list(pin), "unpin": list(unpin)})
        resp.raise_for_status()
        return Pins.model_validate_json(resp.content).pinned

    @_retrying
    async def trainer_config(self, customer: str) -> TenantConfig:
        """The customer's training configuration (the defaults until one is set)."""
        resp = await self.http.get(f"/admin/customers/{customer}/trainer-config")
        resp.raise_for_status()
        return TenantConfig.model_validate_json(resp.content)

    @_retrying
    async def set_trainer_config(self, customer: str, config: TenantConfig) -> TenantConfig:
        """Replace it; a shape the engine cannot serve answers 422."""
        resp = await self.http.put(f"/admin/customers/{customer}/trainer-config", content=config.model_dump_json(),
                                   headers={"Content-Type": "application/json"})
        resp.raise_for_status()
        return TenantConfig.model_validate_json(resp.content)

    @_retrying
    async def load(self) -> Load:
        resp = await self.http.get("/admin/load")
        resp.raise_for_status()
        return Load.model_validate_json(resp.content)

    # -- customers, keys, operators (not retried: a retry of a create would be a second one) ----
    async def create_customer(self, name: str) -> str:
        resp = await self.http.post("/admin/customers", json={"name": name})
        resp.raise_for_status()
        return CreatedKey.model_validate_json(resp.content).key

    async def issue_key(self, customer: str, revoke_existing: bool = False) -> str:
        resp = await self.http.post(f"/admin/customers/{customer}/keys", json={"revoke_existing": revoke_existing})
        resp.raise_for_status()
        return IssuedKey.model_validate_json(resp.content).key

    async def customers(self) -> list[ListedCustomer]:
        resp = await self.http.get("/admin/customers")
        resp.raise_for_status()
        return CustomerList.model_validate_json(resp.content).customers

    async def create_operator(self, name: str, customers: list[str]) -> str:
        resp = await self.http.post("/admin/operators", json={"name": name, "customers": customers})
        resp.raise_for_status()
        return CreatedKey.model_validate_json(resp.content).key
