"""Small test helpers shared by several test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from kafka import KafkaConsumer

T = TypeVar("T")


def read_topic(broker: str, topic: str, parse: Callable[[bytes], T], key: Callable[[T], str],
               wanted: set[str], timeout_s: float = 30, many: bool = False) -> dict[str, T]:
    """Read a topic from the start until every wanted key was seen (or time runs out). `many`:
    `parse` returns a list of items per message."""
    consumer = KafkaConsumer(topic, bootstrap_servers=broker, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
    found: dict[str, T] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not wanted <= found.keys():
            for message in consumer:
                for item in (parse(message.value) if many else [parse(message.value)]):
                    if key(item) in wanted:
                        found[key(item)] = item
    finally:
        consumer.close()
    return found
