"""The routing table: which adapter version serves each customer, and hot-swaps between them.

Everything here runs on the gateway's event loop, so a switch is one dict assignment: a request
resolved before it finishes on the old version, one resolved after starts on the new one. A
version is loaded into the engine on demand (also after it fell out of the engine) and unloaded
when it is neither current nor in use.

Gateways on one Redis agree (`follow`): a route set through any of them is announced on a Redis
channel and applied by every other, and a full resync every few seconds catches an announcement
missed while a gateway's subscription was down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Gauge, Histogram

from clora.runtime.adapters import ROUTES_CHANGED, AdapterRegistry, AdapterVersion
from clora.runtime.engine import Engine

log = logging.getLogger("clora.routing")
SWAP_SECONDS = Histogram("clora_adapter_swap_seconds", "Load + switch of a new adapter version")
LOADED = Gauge("clora_adapters_loaded", "Adapter versions registered with the engine")


class ModelNotFound(LookupError):
    """Unknown model, or one the caller does not own: the two are indistinguishable on purpose."""


class Router:
    def __init__(self, registry: AdapterRegistry, engine: Engine,
                 validate: Callable[[Path], None] = lambda path: None):
        self.registry = registry
        self.engine = engine
        self.validate = validate
        self.routes: dict[str, AdapterVersion] = {}
        self.promoted: set[str] = set()  # versions ever served: callable by name (candidates are not)
        self.loaded: set[str] = set()
        self.inflight: Counter[str] = Counter()
        self.base_inflight = 0
        self._locks: dict[str, _Lock] = {}
        # Bumped by every route this gateway sets: a read of Redis begun before it is stale.
        self._generation: Counter[str] = Counter()

    async def restore(self) -> None:
        self.routes = await self.registry.routes()
        self.promoted = await self.registry.promoted()

    def requests_in_flight(self) -> int:
        return self.base_inflight + sum(self.inflight.values())

    async def resolve(self, customer: str, model: str, candidates: bool = False) -> AdapterVersion | None:
        """`default` -> the customer's current version (None = base model); else a version it owns
        that has been promoted (`candidates`: or not yet, for the admin API only)."""
        if model == "default":
            return self.routes.get(customer)
        version = await self.registry.get(model)
        if version is None or version.customer != customer or not (candidates or version.name in self.promoted):
            raise ModelNotFound(model)
        return version

    @asynccontextmanager
    async def lease(self, version: AdapterVersion | None) -> AsyncIterator[None]:
        """Hold a version loaded for the duration of a request."""
        if version is None:
            self.base_inflight += 1
            try:
                yield
            finally:
                self.base_inflight -= 1
            return
        async with self._locked(version.name):
            await self._ensure_loaded(version)
            self.inflight[version.name] += 1
        try:
            yield
        finally:
            self.inflight[version.name] -= 1
            if self.inflight[version.name] <= 0:
                del self.inflight[version.name]
                await self._unload_if_idle(version)

    async def publish(self, customer: str, source: Path, origin: str = "manual", switch: bool = True,
                      idempotency_key: str | None = None) -> AdapterVersion:
        """New version from adapter files: validate, stage, load into the engine, and only then
        register it; then switch to it, unless it is a candidate (unloaded again: the promotion
        gate switches to it after its eval). A load the engine refuses registers nothing. A retry
        with the same `idempotency_key` (a lost response) returns the version the first made."""
        self.validate(source)
        async with self._locked(f"publish:{customer}:{idempotency_key}") if idempotency_key else _no_lock():
            if idempotency_key and (earlier := await self.registry.published_as(customer, idempotency_key)):
                return earlier
            started = time.perf_counter()
            version = await self.registry.stage(customer, source, origin)
            try:
                async with self._locked(version.name):
                    await self._ensure_loaded(version)
            except BaseException:
                await self.registry.discard(version)
                raise
            await self.registry.commit(version, idempotency_key)
        if switch:
            await self.switch(version)
            SWAP_SECONDS.observe(time.perf_counter() - started)
        else:
            await self._unload_if_idle(version)
        return version

    async def switch(self, version: AdapterVersion) -> None:
        """Make `version` its customer's current one (also how rollback works)."""
        async with self._locked(version.name):
            await self._ensure_loaded(version)
        previous = self.routes.get(version.customer)
        self._generation[version.customer] += 1
        self.routes[version.customer] = version
        self.promoted.add(version.name)
        await self.registry.set_current(version.customer, version.name)
        self._generation[version.customer] += 1  # a read begun before Redis had it is stale too
        log.info("customer %s now served by %s", version.customer, version.name)
        if previous is not None and previous.name != version.name:
            await self._unload_if_idle(previous)

    async def serve_base(self, customer: str) -> None:
        """Serve the customer the base model again (rollback past its first version)."""
        self._generation[customer] += 1
        previous = self.routes.pop(customer, None)
        await self.registry.set_current(customer, None)
        self._generation[customer] += 1
        log.info("customer %s now served by the base model", customer)
        if previous is not None:
            await self._unload_if_idle(previous)

    async def delete_customer(self, customer: str, drain_s: float = 30.0) -> list[str]:
        """Unload every version of the customer from the engine (after its requests in flight end,
        up to `drain_s`) and delete them. Its keys must be revoked first: nothing new arrives."""
        self._generation[customer] += 1
        self.routes.pop(customer, None)
        versions = await self.registry.versions(customer)
        deadline = time.monotonic() + drain_s
        while any(self.inflight.get(v.name) for v in versions) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for version in versions:
            async with self._locked(version.name):
                if version.name in self.loaded:
                    self.loaded.discard(version.name)
                    LOADED.set(len(self.loaded))
                    await self.engine.unload_adapter(version.name)
            self.promoted.discard(version.name)
        deleted = await self.registry.delete_customer(customer)
        self._generation[customer] += 1
        return deleted

    async def reload_all(self) -> None:
        """After an engine (re)start: nothing is loaded; bring back every current version."""
        self.loaded.clear()
        for version in list(self.routes.values()):
            async with self._locked(version.name):
                await self._ensure_loaded(version)

    async def follow(self, stop: asyncio.Event, resync_s: float = 5.0) -> None:
        """Until `stop`: apply the routes other gateways set (announced on `ROUTES_CHANGED`), and
        resync the whole table every `resync_s`. Redis away: warned, and tried again."""
        while not stop.is_set():
            pubsub = self.registry.redis.pubsub()
            try:
                await pubsub.subscribe(ROUTES_CHANGED)
                await self.resync()  # what changed before the subscription
                synced = time.monotonic()
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        await self.refresh(message["data"].decode())
                    if time.monotonic() - synced >= resync_s:
                        await self.resync()
                        synced = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - routes must keep following once Redis is back
                log.warning("route following interrupted (%s: %s); again in 1 s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    async def refresh(self, customer: str) -> None:
        """The customer's route as Redis has it now."""
        generation = self._generation[customer]
        version = await self.registry.current(customer)
        if self._generation[customer] == generation:  # else this gateway set it meanwhile: newer
            await self._apply(customer, version)

    async def resync(self) -> None:
        """Every route as Redis has it now."""
        generations = dict(self._generation)
        routes, promoted = await self.registry.routes(), await self.registry.promoted()
        self.promoted |= promoted
        for customer in set(self.routes) | set(routes):
            if self._generation[customer] == generations.get(customer, 0):
                await self._apply(customer, routes.get(customer))

    async def _apply(self, customer: str, version: AdapterVersion | None) -> None:
        previous = self.routes.get(customer)
        if (previous and previous.name) == (version and version.name):
            return
        if version is None:
            self.routes.pop(customer, None)
        else:
            self.routes[customer] = version
            self.promoted.add(version.name)
        log.info("customer %s now served by %s (set through another gateway)", customer,
                 version.name if version else "the base model")
        if previous is not None:
            await self._unload_if_idle(previous)

    def forget(self, name: str) -> None:
        """The engine no longer knows this name (it said 404): load it again on next use."""
        self.loaded.discard(name)

    @asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Hold the version's lock: its loads and unloads never interleave. The lock is dropped
        only when nobody holds or waits for it (a waiter being woken still counts), so two
        callers can never hold two different locks for one name."""
        entry = self._locks.setdefault(name, _Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]

    async def _ensure_loaded(self, version: AdapterVersion) -> None:
        if version.name not in self.loaded:
            await self.engine.load_adapter(version.name, Path(version.path))
            self.loaded.add(version.name)
            LOADED.set(len(self.loaded))

    async def _unload_if_idle(self, version: AdapterVersion) -> None:
        async with self._locked(version.name):
            current = self.routes.get(version.customer)
            if (version.name in self.loaded and not self.inflight.get(version.name)
                    and (current is None or current.name != version.name)):
                self.loaded.discard(version.name)
                LOADED.set(len(self.loaded))
                await self.engine.unload_adapter(version.name)


@dataclass
class _Lock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


@asynccontextmanager
async def _no_lock() -> AsyncIterator[None]:
    yield
