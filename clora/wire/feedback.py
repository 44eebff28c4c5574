"""Typed records of the feedback pipeline: what the webhook accepts, what Kafka carries, and what
the replay buffer holds for the trainer."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clora.wire.interactions import InteractionRecord

Kind = Literal["correction", "reward", "rating", "comment"]


class FeedbackEvent(BaseModel):
    """One piece of feedback on one served answer (the webhook body, or one item of a batch)."""

    model_config = ConfigDict(extra="forbid")
    trace_id: str = Field(min_length=1, max_length=128)
    reward: float | None = Field(default=None, ge=-1.0, le=1.0)
    rating: Literal["up", "down"] | None = None
    correction: dict[str, Any] | None = Field(default=None, description="The assistant message wanted instead.")
    comment: str | None = Field(default=None, max_length=4000)
    source: Literal["user", "operator", "automated"] = "user"
    event_id: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="Idempotency key: the same id is applied once.")

    @model_validator(mode="after")
    def _has_signal(self) -> "FeedbackEvent":
        if self.reward is None and self.rating is None and self.correction is None and self.comment is None:
            raise ValueError("feedback needs at least one of reward, rating, correction, comment")
        if self.correction is not None:
            content = self.correction.get("content")
            if self.correction.get("role", "assistant") != "assistant" or not isinstance(content, str) or not content:
                raise ValueError("correction must be an assistant message with non-empty string content")
        return self

    def kind(self) -> Kind:
        """The strongest training signal this event carries (eviction keeps corrections longest)."""
        if self.correction is not None:
            return "correction"
        if self.reward is not None:
            return "reward"
        if self.rating is not None:
            return "rating"
        return "comment"

    def scalar_reward(self) -> float | None:
        if self.reward is not None:
            return self.reward
        if self.rating is not None:
            return 1.0 if self.rating == "up" else -1.0
        return None


class FeedbackSignal(BaseModel):
    """The feedback half of a training record."""

    event_id: str
    customer: str
    trace_id: str
    kind: Kind
    source: str
    reward: float | None
    correction: dict[str, Any] | None = None
    comment: str | None = None
    created_at: float = Field(description="Unix time the webhook accepted the feedback.")
    ingested_at: float | None = Field(default=None, description="Unix time the consumer joined it (data freshness).")


class TrainingRecord(FeedbackSignal):
    """An interaction joined with its feedback: the unit the trainer samples.

    The captured interaction is embedded as it came off the topic, so a join never re-parses it
    (see `joined_record`) and the trainer sees everything the gateway recorded (sampling parameters too).
    """

    interaction: InteractionRecord

    @property
    def adapter(self) -> str | None:
        """Version that produced the answer (None = base model)."""
        return self.interaction.adapter

    @property
    def adapter_version(self) -> int | None:
        return self.interaction.adapter_version

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.interaction.request.messages

    @property
    def response(self) -> dict[str, Any]:
        return self.interaction.choices[0].message

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.interaction.prompt_token_ids

    @property
    def completion_token_ids(self) -> list[int]:
        return self.interaction.choices[0].token_ids

    @property
    def behaviour_logprobs(self) -> list[float]:
        return self.interaction.choices[0].logprobs


class SerializedRecord(NamedTuple):
    """A TrainingRecord as the replay buffer stores it: its JSON, and what the push needs to know."""

    customer: str
    event_id: str
    kind: Kind
    json: bytes


def joined_record(event: FeedbackEvent, post: FeedbackPost, interaction_json: bytes,
                  ingested_at: float) -> SerializedRecord:
    """A TrainingRecord's JSON from its two halves, both already validated: the interaction's JSON
    embedded as captured (never re-parsed) and the feedback half (a FeedbackSignal's fields)
    written without building a FeedbackSignal (ingestion joins ~10,000 events a second; a model
    each was a seventh of its CPU)."""
    kind = event.kind()
    signal = {"event_id": event.event_id, "customer": post.customer, "trace_id": event.trace_id, "kind": kind,
              "source": event.source, "reward": event.scalar_reward(), "correction": event.correction,
              "comment": event.comment, "created_at": post.received_at, "ingested_at": ingested_at}
    return SerializedRecord(post.customer, event.event_id or "", kind,
                            orjson.dumps(signal)[:-1] + b',"interaction":' + interaction_json + b"}")


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent] = Field(min_length=1, max_length=1000)


class FeedbackMessage(BaseModel):
    """One event of one customer with who submitted it: what ingestion joins, what waits in Redis
    for its interaction and what a dead letter holds. On the feedback topic as the events of a
    `FeedbackPost`; a message of this shape alone (a re-driven dead letter) is read as well."""

    event: FeedbackEvent
    customer: str
    submitted_by: str = Field(description="`customer`, or `operator:<name>`.")
    received_at: float


class FeedbackPost(BaseModel):
    """What the webhook puts on the feedback topic (keyed by customer): the events one request
    submitted for one customer, as one message. One message per event cost kafka-python tens of
    microseconds on each side, more than the rest of an event's path through the webhook."""

    id: str = Field(description="Unique per message: the outbox's id, confirmed once ingestion handled it.")
    customer: str
    submitted_by: str = Field(description="`customer`, or `operator:<name>`.")
    received_at: float
    events: list[FeedbackEvent] = Field(min_length=1)

    def messages(self) -> list[FeedbackMessage]:
        return [self.message(event) for event in self.events]

    def message(self, event: FeedbackEvent) -> FeedbackMessage:
        """One of its events on its own (what waits in Redis for its interaction)."""
        return FeedbackMessage(event=event, customer=self.customer, submitted_by=self.submitted_by,
                               received_at=self.received_at)

    @classmethod
    def of(cls, message: FeedbackMessage) -> FeedbackPost:
        """A lone message as a post of one event, its id the event's id."""
        return cls(id=message.event.event_id or "", customer=message.customer, submitted_by=message.submitted_by,
                   received_at=message.received_at, events=[message.event])


def parse_feedback_value(value: bytes) -> FeedbackPost:
    """A feedback topic message as a post (a lone message, e.g. a re-driven dead letter, is a post
    of one event whose id is the event's). Raises ValueError. A post is tried first (what the
    webhook sends; a union validator cost 1.7x as much)."""
    try:
        post = FeedbackPost.model_validate_json(value)
    except ValidationError as not_a_post:
        try:
            post = FeedbackPost.of(FeedbackMessage.model_validate_json(value))
        except ValidationError:
            raise not_a_post from None
    if not all(event.event_id for event in post.events):
        raise ValueError("feedback without event_id")
    return post


def feedback_customer(value: bytes) -> str:
    """The customer (the partition key) of a feedback topic message. Raises ValueError."""
    return parse_feedback_value(value).customer


class DeadLetter(BaseModel):
    """A message ingestion could not use, on the dead-letter topic: why, and where it came from."""

    reason: str
    topic: str
    partition: int
    offset: int
    value_b64: str
