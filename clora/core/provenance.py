"""Where a result came from: what every results file (`benchmarks/results/*.json`, the demo's
report) records so that someone else can re-run it and compare: the code (`git_revision`, and
whether the tree had uncommitted changes), the machine (CPU model), when it started, the command
as run, and `settings_changed`: every `CLORA_` setting and every trainer-config field the run set
to something other than its default, in one flat object."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from clora.core.settings import Settings, variables
from clora.core.settings import defaults as settings_defaults
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[2]
SECRETS = {"admin_key", "trace_secret"}  # recorded as set, never their values
CREDENTIALS = re.compile(r"://[^@/\s]+@")  # user:password@ in a URL (redis_url, kafka_bootstrap)


def _redacted(name: str, value: Any) -> Any:
    if name.lower() in SECRETS and value is not None:
        return "<redacted>"
    return CREDENTIALS.sub("://<redacted>@", value) if isinstance(value, str) else value


def machine() -> str:
    """CPU model (with AMX where present: bfloat16 speed on a CPU depends on it), cores, memory, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        if "amx_bf16" in info:
            cpu += " (AMX)"
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - the description must not fail the report
        gpu = "GPU unknown"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} vCPU {cpu}, {memory_gib:.0f} GiB RAM, {gpu}, {platform.system()} {platform.release()}"


def git_revision(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """The checked-out commit and whether tracked files differ from it (None, None: not a git checkout)."""
    try:
        revision = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return revision, bool(status.strip())


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_changed(settings: Settings | None = None, config: BaseModel | None = None,
                     ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every setting in `settings` (under its `CLORA_` name) and every field of the trainer config
    `config` (under its own name; nested ones dotted: `weights.correction`) whose value is not its
    default; `ignore`: config fields that vary by design and are recorded elsewhere (a seed)."""
    changed: dict[str, Any] = {}
    if settings is not None:
        defaults = settings_defaults()
        for name, value in settings.values().items():
            if value != defaults[name]:
                changed[name] = _redacted(name.removeprefix("CLORA_"), value)
    if config is not None:
        defaults = _flat(type(config)().model_dump(mode="json"))
        for name, value in _flat(config.model_dump(mode="json")).items():
            if name not in ignore and value != defaults.get(name):
                changed[name] = value
    return changed


def command(program: str = "clora") -> str:
    """The command line as run, after the `CLORA_` variables it ran under (a re-run needs them;
    secrets redacted). Only Settings' own: a process may export plumbing of its own
    (CLORA_ENGINE_LOG). Take it before an in-process engine starts: the engine exports settings
    for its children (CLORA_GROUPED_LORA) into this process's environment."""
    names = variables()
    env = [f"{k}={_redacted(k.removeprefix('CLORA_'), v)}" for k, v in sorted(os.environ.items()) if k in names]
    return " ".join([*env, program, *sys.argv[1:]])


def provenance(program: str, settings: Settings | None = None, config: TenantConfig | BaseModel | None = None,
               ignore: tuple[str, ...] = (), started_at: dt.datetime | None = None,
               command_line: str | None = None) -> dict[str, Any]:
    """The fields every results file records (see the module's note); `program`: how the command
    is invoked (`clora`, `python benchmarks/x.py`); `command_line`: `command(program)` taken at
    the start, where an engine has started since."""
    revision, dirty = git_revision()
    started = started_at or dt.datetime.now(dt.timezone.utc)
    return {"git_revision": revision, "git_dirty": dirty, "machine": machine(),
            "started_at": started.isoformat(timespec="seconds"), "command": command_line or command(program),
            "settings_changed": settings_changed(settings, config, ignore)}
