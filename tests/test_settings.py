"""Settings: paths handed to child processes (vLLM runs in the run directory) are absolute."""

from __future__ import annotations

from pathlib import Path

from clora.core.settings import Settings


def test_a_relative_home_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(home=Path(".clora"))
    assert settings.home == tmp_path / ".clora"
    assert settings.cache_dir.is_absolute() and settings.adapters_dir.is_absolute()
