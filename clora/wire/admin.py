"""The admin API's bodies and answers: what `/admin/...` takes and gives, one model per answer.

The gateway declares these as its endpoints' response models (so `/openapi.json` shows them), and
the admin client (`clora.core.admin_client`) parses every answer into them, so the CLI, the
trainer, the eval job and the demo read fields, not string keys. Pydantic only: the lowest layer.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# -- request bodies ---------------------------------------------------------------------------------


class PublishBody(BaseModel):
    path: str
    origin: str = Field(default="manual", max_length=200, description="Who made it (the trainer names its checkpoint).")
    switch: bool = Field(default=True, description="Serve it now; false = a candidate for the promotion gate.")


class RouteBody(BaseModel):
    adapter: str


class CustomerBody(BaseModel):
    name: str = Field(min_length=1, max_length=63, description="a-z 0-9 _ -, starting with a letter or digit.")


class KeyBody(BaseModel):
    revoke_existing: bool = Field(default=False, description="Revoke the customer's other keys (a rotation).")


class OperatorBody(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    customers: list[str] = Field(min_length=1, max_length=10_000, description="Customers whose traces it may rate.")


class PinBody(BaseModel):
    pin: list[str] = Field(default_factory=list, description="Versions kept through pruning from now on.")
    unpin: list[str] = Field(default_factory=list, description="Versions pruning may delete again.")


# -- adapter versions and routes ---------------------------------------------------------------------


class AdapterVersion(BaseModel):
    """One immutable adapter version (`<customer>.v<N>`); `source` is the publisher's origin."""

    name: str
    customer: str
    version: int
    path: str
    created_at: float
    source: str = "manual"


class Published(AdapterVersion):
    """`POST /admin/customers/{c}/adapters`: the version made (or, for a retried idempotency key,
    the one the first request made) and how long loading and switching took."""

    swap_ms: float


class ListedVersion(AdapterVersion):
    promoted: bool  # served at some time, so callable by the customer by name


class CustomerVersions(BaseModel):
    """`GET /admin/customers/{c}/adapters`: oldest first, and the one served now (None: the base model)."""

    customer: str
    current: str | None
    versions: list[ListedVersion]

    def served(self) -> ListedVersion | None:
        return next((v for v in self.versions if v.name == self.current), None)

    def newest_number(self) -> int:
        return max((v.version for v in self.versions), default=0)


class ServedBase(BaseModel):
    """`DELETE /admin/customers/{c}/route`: the customer is served the base model."""

    customer: str
    current: None = None


class Pins(BaseModel):
    customer: str
    pinned: list[str]


class SampledCompletion(BaseModel):
    """`POST /admin/customers/{c}/sample`: vLLM's chat completion (with `prompt_token_ids` and each
    choice's token ids and sampled-token logprobs) and the version that produced it."""

    model_config = ConfigDict(extra="allow")

    adapter: str | None  # None: the base model
    prompt_token_ids: list[int] | None = None
    choices: list[dict[str, Any]]


class Load(BaseModel):
    """`GET /admin/load`: how busy serving is (the trainer yields the machine when it is)."""

    requests_in_flight: int
    engine_ready: bool


# -- replay buffers and feedback fates ---------------------------------------------------------------


class ReplayStats(BaseModel):
    customer: str
    size: int
    capacity: int
    pushed: int
    duplicates: int
    evicted: int
    by_kind: dict[str, int]
    consumed: int
    quarantined: int = 0  # held in its quarantine: moved out by the trainer, their logprob gap over the bound
    waiting: int = 0  # feedback events ingestion holds until their interaction arrives
    dead_lettered: int = 0  # feedback events ingestion dead-lettered (unjoinable; kept a week after the last)


class ReplayEntry(BaseModel):
    """A record of the buffer as an operator sees it (its feedback, not the whole interaction)."""

    event_id: str
    trace_id: str
    kind: str
    source: str
    reward: float | None
    created_at: float
    ingested_at: float | None
    consumed_by: list[str]  # adapter versions whose training steps used it


class ReplayReport(BaseModel):
    """`GET /admin/customers/{c}/replay`."""

    stats: ReplayStats
    newest: list[ReplayEntry]


FateState = Literal["accepted", "waiting", "in_buffer", "trained", "quarantined", "evicted", "dead"]


class EventFate(BaseModel):
    """`GET /admin/customers/{c}/feedback/{event_id}`."""

    customer: str
    event_id: str
    state: FateState
    trace_id: str | None = None
    trained_by: list[str] = []  # adapter versions whose steps used it
    reason: str | None = None  # dead or quarantined: why
    at: float | None = None  # dead or quarantined: when


# -- customers, keys, limits, operators, audit -------------------------------------------------------


class ListedCustomer(BaseModel):
    name: str
    created_at: float
    keys: int  # API keys that work now


class CustomerList(BaseModel):
    customers: list[ListedCustomer]


class CreatedKey(BaseModel):
    """A new customer's (or operator's) name and its key: shown once, in this answer only."""

    name: str
    key: str


class IssuedKey(BaseModel):
    customer: str
    key: str
    revoked: int  # other keys revoked with it (a rotation)


class RevokedKeys(BaseModel):
    customer: str
    revoked: int


class DeletedCustomer(BaseModel):
    customer: str
    revoked_keys: int
    versions: list[str]  # adapter versions deleted
    replay_records: int = 0
    eval_scores: int = 0


class CustomerLimits(BaseModel):
    """The limits in force for the customer; `own`: its own, else the server's defaults."""

    customer: str
    own: bool
    max_concurrent: int
    requests_per_s: float
    tokens_per_min: int


class ListedOperator(BaseModel):
    name: str
    customers: list[str]


class OperatorList(BaseModel):
    operators: list[ListedOperator]


class RevokedOperator(BaseModel):
    name: str
    revoked: bool


class AuditEntry(BaseModel):
    at: float = Field(default_factory=time.time)
    actor: str  # "admin": the admin key (one key today; named actors when there are several)
    action: str  # e.g. "customer.create", "adapter.publish", "route.set"
    customer: str | None = None
    detail: dict[str, Any] = {}


class AuditEntries(BaseModel):
    entries: list[AuditEntry]  # newest first
