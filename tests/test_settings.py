"""Settings: paths handed to child processes are absolute, and a child gets the parent's settings."""

from __future__ import annotations

import os
from pathlib import Path

from clora.core.settings import Settings


def test_a_relative_home_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(home=Path(".clora"))
    assert settings.home == tmp_path / ".clora"
    assert settings.cache_dir.is_absolute() and settings.adapters_dir.is_absolute()


def test_a_child_process_gets_exactly_the_parents_settings(tmp_path, monkeypatch):
    """Settings a parent set in code (the demo's trainer pacing) reach the trainer child through
    `child_env`: read back from those variables alone, they are the same settings."""
    for name in [k for k in os.environ if k.startswith("CLORA_")]:
        monkeypatch.delenv(name)
    parent = Settings(home=tmp_path, trainer_idle_s=1.0, trainer_max_inflight=0, lora_target_modules=["o_proj"],
                      engine_extra_args=["--seed", "3"], trainer_enabled=False, eval_tolerance=0.1)
    for name, value in parent.child_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == parent
