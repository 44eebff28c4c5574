"""What a background component of the runtime reports to `GET /healthz`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ComponentHealth(BaseModel):
    """`ok` False marks the component degraded: reported, but a serving replica stays in rotation."""

    state: str
    ok: bool
    detail: dict[str, Any] = {}
