"""Trace ids that prove which customer they were issued to.

`chatcmpl-<nonce><mac>`, the MAC an HMAC of customer and nonce under a server secret. The
feedback webhook can tell "this trace is yours" without a storage lookup on the serving path, and
a trace of another customer is indistinguishable from one that was never issued.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "chatcmpl-"
NONCE_HEX = 16
MAC_HEX = 24


class TraceSigner:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("trace secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, customer: str, nonce: str) -> str:
        return hmac.new(self._secret, f"{customer}\x00{nonce}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]

    def new(self, customer: str) -> str:
        nonce = secrets.token_hex(NONCE_HEX // 2)
        return f"{PREFIX}{nonce}{self._mac(customer, nonce)}"

    def issued_to(self, trace_id: str, customer: str) -> bool:
        body = trace_id[len(PREFIX):] if trace_id.startswith(PREFIX) else ""
        if len(body) != NONCE_HEX + MAC_HEX:
            return False
        nonce, mac = body[:NONCE_HEX], body[NONCE_HEX:]
        return hmac.compare_digest(mac, self._mac(customer, nonce))
