"""What a running `clora serve` tells other processes: its state file (addresses, pid) and the
secrets it keeps in the data dir (admin key, trace-signing key), each created once and kept 0600.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from clora.core.settings import Settings


def serve_state(settings: Settings) -> dict | None:
    """What a running `clora serve` wrote about itself, if it is still alive."""
    try:
        state = json.loads(settings.state_file.read_text())
        os.kill(state["pid"], 0)
        return state
    except (OSError, ValueError, KeyError):
        return None


def admin_key(settings: Settings) -> str:
    """CLORA_ADMIN_KEY, else one generated on first start and kept (0600) in the data dir."""
    if settings.serving.admin_key:
        return settings.serving.admin_key
    return _secret_file(settings.home / "admin_key", "sk-clora-admin-")


def trace_secret(settings: Settings) -> bytes:
    """CLORA_TRACE_SECRET (shared by every gateway replica), else one generated and kept (0600)."""
    if settings.serving.trace_secret:
        return settings.serving.trace_secret.encode()
    return _secret_file(settings.home / "trace_secret", "").encode()


def _secret_file(path: Path, prefix: str) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(prefix + secrets.token_urlsafe(32))
    return path.read_text().strip()
