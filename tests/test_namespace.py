"""One import namespace: the installed project is `clora` and nothing else, so it lives beside a
user's packages (the OpenAI Agents SDK's `agents` included); and the lower layers load without
the heavy stacks above them (each checked in a fresh interpreter, from outside the checkout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("runtime", "feedback", "agents", "trainer", "evals")
# The SDK and what `import agents` needs that the venv lacks (0.6.1 wants griffe 1 and mcp 1).
OPENAI_AGENTS = ["openai-agents==0.6.1", "griffe<2", "mcp<2", "colorama", "types-requests"]


def python(code: str, cwd: Path, extra_path: Path | None = None) -> str:
    """Run `code` in a fresh interpreter of this venv, from `cwd`, with nothing of the checkout on
    the path unless the installation puts it there; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_only_clora_resolves_outside_the_checkout(tmp_path):
    out = json.loads(python(
        "import importlib.util, json, clora, clora.runtime.gateway\n"
        f"found = {{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {STAGES!r}}}\n"
        "print(json.dumps({'stages': found, 'clora': clora.__file__, 'gateway': clora.runtime.gateway.__file__}))",
        tmp_path))
    for name, origin in out["stages"].items():
        assert origin is None or not Path(origin).resolve().is_relative_to(REPO), f"`import {name}` finds {origin}"
    assert Path(out["clora"]).resolve() == REPO / "clora" / "__init__.py"
    assert Path(out["gateway"]).resolve() == REPO / "runtime" / "gateway.py"  # the design card's folders


def test_bottom_layer_and_feedback_load_without_torch_or_vllm(tmp_path):
    modules = [f"clora.core.{m}" for m in ("settings", "processes", "services", "models", "customers", "traces",
                                           "http", "admin_client", "state")]
    modules += [f"clora.wire.{m}" for m in ("interactions", "feedback", "kafka")]
    modules += [f"clora.feedback.{m}" for m in ("webhook", "consumer", "replay")]
    loaded = json.loads(python(
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))", tmp_path))
    assert "clora" in loaded and "redis" in loaded
    assert "torch" not in loaded and "vllm" not in loaded


def test_the_cli_loads_torch_only_for_the_commands_that_need_it(tmp_path):
    """`clora customers create` and friends stay quick: torch, vLLM and matplotlib load inside the
    commands that use them (train, demo; serve through vLLM), not with the CLI."""
    loaded = json.loads(python("import json, sys, clora.cli.main\n"
                               "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))", tmp_path))
    assert "typer" in loaded and not {"torch", "vllm", "matplotlib", "transformers"} & set(loaded)


def test_trainer_maths_load_with_torch_alone(tmp_path):
    """What a GPU machine with only torch (and safetensors) needs: no redis, kafka or vLLM."""
    modules = [f"clora.trainer.{m}" for m in ("losses", "lora", "batching", "adapter_store", "optim", "step")]
    loaded = json.loads(python(
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))", tmp_path))
    assert "torch" in loaded
    assert not {"redis", "kafka", "vllm", "fastapi", "httpx"} & set(loaded), loaded


@pytest.fixture(scope="session")
def openai_agents(tmp_path_factory) -> Path:
    """The OpenAI Agents SDK in a folder of its own (its dependencies that the venv lacks too),
    so the product's venv stays as it is."""
    target = tmp_path_factory.mktemp("openai-agents")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target)]
    subprocess.run(pip + ["--no-deps", *OPENAI_AGENTS], check=True, capture_output=True, timeout=600)
    return target


def test_openai_agents_sdk_and_clora_side_by_side(tmp_path, openai_agents):
    out = python(
        "import agents, clora.agents.catalog, clora.cli.main\n"
        "from agents import Agent\n"
        "from clora.agents.preference import PreferenceEnv\n"
        "agent = Agent(name='support', instructions='Be brief.')\n"
        "env = clora.agents.catalog.make_env('preference:json')\n"
        "print(agents.__file__, agent.name, type(env).__name__)", tmp_path, extra_path=openai_agents)
    sdk_file, name, env = out.split()
    assert Path(sdk_file).is_relative_to(openai_agents)
    assert (name, env) == ("support", "PreferenceEnv")
