"""`clora dead-letters` against the real broker: list both sources, re-drive each once."""

from __future__ import annotations

import base64
import json
import uuid

from kafka import KafkaProducer
from typer.testing import CliRunner

from clora.cli.main import app
from clora.runtime.spool import DeadLetters, SpooledMessage
from clora.wire.feedback import DeadLetter
from tests.helpers import read_topic
from tests.test_capture import record


def test_dead_letters_are_listed_and_redriven_once(broker, tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("CLORA_HOME", str(tmp_path))
    monkeypatch.setenv("CLORA_KAFKA_BOOTSTRAP", broker)
    monkeypatch.setenv("CLORA_DEAD_LETTER_TOPIC", f"dead.{tag}")
    monkeypatch.setenv("CLORA_INGEST_GROUP", f"g.{tag}")
    captured = record(1)
    (tmp_path / "spool").mkdir()
    DeadLetters(tmp_path / "spool" / "dead-letters.jsonl").add(
        SpooledMessage(f"i.{tag}", b"acme", captured.model_dump_json().encode()), "MessageSizeTooLargeError: big")
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    late = b'{"late": "feedback"}'
    letter = DeadLetter(reason="no interaction for trace t within 300s", topic=f"f.{tag}", partition=-1, offset=-1,
                        value_b64=base64.b64encode(late).decode())
    producer.send(f"dead.{tag}", key=b"f", value=json.dumps(letter.model_dump()).encode()).get(timeout=10)
    producer.close()
    runner = CliRunner()

    shown = runner.invoke(app, ["dead-letters", "list"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "MessageSizeTooLargeError" in shown.output and "no interaction for trace t" in shown.output

    result = runner.invoke(app, ["dead-letters", "redrive", "capture"])
    assert result.exit_code == 0 and "1 capture dead letters sent again" in result.output, result.output
    assert read_topic(broker, f"i.{tag}", lambda v: v, lambda v: "record", {"record"})["record"] == \
        captured.model_dump_json().encode()
    assert not (tmp_path / "spool" / "dead-letters.jsonl").exists()

    result = runner.invoke(app, ["dead-letters", "redrive", "feedback"])
    assert result.exit_code == 0 and "1 feedback dead letters sent again" in result.output, result.output
    assert read_topic(broker, f"f.{tag}", lambda v: v, lambda v: "late", {"late"})["late"] == late
    again = runner.invoke(app, ["dead-letters", "redrive", "feedback"])  # taken once
    assert "0 feedback dead letters sent again" in again.output, again.output
