"""Every environment a tenant config or an eval suite can name: importing this module registers them.

Callers name environments through `make_env`; the registry (`envs`) never imports an environment.
"""

from __future__ import annotations

from clora.agents import arithmetic, preference, tokens  # noqa: F401 - each registers its environments on import
from clora.agents.envs import Environment, EpisodicEnvironment, build


def make_env(spec: str) -> Environment | EpisodicEnvironment:
    """`name:args` -> an environment, e.g. `token-range:0-24576`, `preference:json`, `arithmetic:1`."""
    return build(spec)
