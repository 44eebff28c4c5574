"""A measurement probe, not a product path: the gateway's per-request work run inside vLLM's API
server process, to measure what removing the gateway -> vLLM hop would save.

`latency_breakdown.py` starts `clora serve` with `--middleware in_engine_probe.InEngineGateway`
passed to vLLM. Requests carrying `X-Clora-Probe: 1` then get, inside vLLM's process: the body
read and validated as the gateway does, the bearer key hashed, a signed trace id, the upstream
rewrite (token ids + logprobs asked for), vLLM's own handler called in-process (no socket), the
answer stripped for the client, and the interaction record built and handed to the real capture
(batched to the real Kafka broker, ingested by `clora serve` like any other). Missing next to the
gateway: the customer lookup in Redis (the gateway caches it), routing leases and metrics.
Every other request passes through untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import orjson

from runtime.capture import Capture
from runtime.customers import hash_key
from runtime.protocol import NON_SAMPLING, ChatRequest
from runtime.records import CapturedRequest, InteractionRecord
from runtime.responses import ClientWants, captured_choices, for_client
from runtime.spool import Spool
from runtime.traces import TraceSigner

PROBE_HEADER = b"x-clora-probe"


class InEngineGateway:
    def __init__(self, app):
        self.app = app
        self.traces = TraceSigner(os.urandom(32))
        self.customers: dict[str, str] = {}
        self.capture: Capture | None = None

    def _capture(self) -> Capture:
        if self.capture is None:  # the broker's address is known once `clora serve` wrote its state
            state = json.loads((Path(os.environ["CLORA_HOME"]) / "serve.json").read_text())
            spool = Spool(Path(tempfile.mkdtemp(prefix="clora-probe-spool-")), 1 << 26)
            self.capture = Capture(state["kafka_bootstrap"], "clora.interactions", spool).start()
        return self.capture

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions" or PROBE_HEADER not in headers:
            return await self.app(scope, receive, send)
        arrived = time.time()
        customer = self.customers.setdefault(hash_key(headers.get(b"authorization", b"")[7:].decode()), "probe")
        raw = await _read_body(receive)
        body = orjson.loads(raw)
        chat = ChatRequest.model_validate(body)
        trace_id = self.traces.new(customer)
        wants = ClientWants(logprobs=bool(chat.logprobs), token_ids=bool(chat.return_token_ids))
        upstream = orjson.dumps(dict(body, return_token_ids=True, logprobs=True, top_logprobs=0))
        status, answer = await self._call_engine(scope, receive, upstream)
        payload = orjson.loads(answer)
        out = orjson.dumps(for_client(payload, trace_id, chat.model, wants))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
                                (b"x-clora-trace-id", trace_id.encode())]})
        await send({"type": "http.response.body", "body": out})
        self._capture().submit(InteractionRecord(
            trace_id=trace_id, customer=customer, adapter=None, base_model="probe",
            request=CapturedRequest(messages=body["messages"], tools=chat.tools, tool_choice=chat.tool_choice,
                                    sampling={k: v for k, v in body.items() if k not in NON_SAMPLING}),
            prompt_token_ids=payload.get("prompt_token_ids") or [], choices=captured_choices(payload),
            latency_ms=(time.time() - arrived) * 1000, created_at=arrived))

    async def _call_engine(self, scope, client_receive, body: bytes) -> tuple[int, bytes]:
        """vLLM's own app, called in-process with the rewritten body; its answer collected."""
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"authorization")]
        delivered = False

        async def receive():
            nonlocal delivered
            if delivered:  # vLLM then listens for the client going away
                return await client_receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        status, chunks = 500, []

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())]), receive, send)
        return status, b"".join(chunks)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)

