"""vLLM is imported only inside the engine package (`clora.runtime.engine`, `runtime/engine/`):
the engine manager, in our process, and our vLLM plugin (`plugin`, `punica`: the grouped CPU LoRA
path) inside vLLM's. Everything else, the gateway included, sees the engine through the `Engine`
protocol (`runtime/engine/protocol.py`), so a vLLM upgrade touches one folder.

We use vLLM below its HTTP surface (its argument parser, `AsyncLLM`, `build_app`,
`init_app_state`, its punica wrapper), which a vLLM upgrade may change. The package's own
protocol, config, client and pure-torch `lora_ops` load without vLLM, and so does the package
itself (its imports of vLLM stay inside functions or in modules only vLLM loads).
Modules are read as text (AST), never imported, so an import that only runs inside a function is
found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.test_layers import module_files

ENGINE = "clora.runtime.engine"
IMPORTERS = {f"{ENGINE}.manager", f"{ENGINE}.plugin", f"{ENGINE}.punica"}  # the modules that do import it
DYNAMIC_IMPORTERS = {"import_module", "__import__"}  # importlib.import_module("vllm..."), __import__("vllm")


def _is_vllm(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] == "vllm"


def _dynamic_target(node: ast.Call) -> str | None:
    """The module named by a literal `import_module(...)` or `__import__(...)` call, if any."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant):
        return node.args[0].value if isinstance(node.args[0].value, str) else None
    return None


def vllm_imports(module: str, source: str) -> list[str]:
    """`module:line imports name` for every import of vLLM in the source, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.level == 0 else []
        elif isinstance(node, ast.Call):
            names = [_dynamic_target(node)]
        else:
            continue
        found += [f"{module}:{node.lineno} imports `{name}`" for name in names if _is_vllm(name)]
    return found


def in_engine_package(module: str) -> bool:
    return module == ENGINE or module.startswith(f"{ENGINE}.")


def violations(sources: dict[str, str]) -> list[str]:
    """Every vLLM import outside the engine package."""
    return [problem for module, source in sorted(sources.items()) if not in_engine_package(module)
            for problem in vllm_imports(module, source)]


def test_only_the_engine_package_imports_vllm():
    sources = {module: path.read_text() for module, path in module_files().items()}
    assert IMPORTERS | {ENGINE, f"{ENGINE}.protocol", f"{ENGINE}.config", f"{ENGINE}.client", f"{ENGINE}.lora_ops",
                        f"{ENGINE}.child"} <= sources.keys()
    assert all(vllm_imports(module, sources[module]) for module in IMPORTERS), "the checker finds their vLLM imports"
    assert violations(sources) == []


@pytest.mark.integration  # starts a process
def test_serving_and_the_engine_package_load_without_vllm():
    """Importing the package (its protocol, config, client and ops) and the whole of serving loads
    no vLLM module: the package's imports of vLLM stay lazy, so serving runs beside a fake engine."""
    modules = ["clora.runtime.engine", "clora.runtime.engine.config", "clora.runtime.engine.client",
               "clora.runtime.engine.lora_ops", "clora.runtime.gateway", "clora.runtime.routing", "clora.stack"]
    probe = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[-2000:]


PLANTED = '''
import asyncio

async def build():
    from vllm.entrypoints import x
    return x
'''


def test_a_planted_vllm_import_outside_the_engine_package_is_found():
    sources = {module: path.read_text() for module, path in module_files().items()}
    sources["clora.runtime.routing"] += PLANTED
    sources["clora.runtime.engine.client"] += PLANTED  # inside the package: allowed
    problems = violations(sources)
    assert len(problems) == 1 and problems[0].startswith("clora.runtime.routing:"), problems
    assert problems[0].endswith("imports `vllm.entrypoints`")


def test_every_form_of_import_is_found():
    source = ("import vllm\nimport vllm.v1 as v1\nfrom vllm import LLM\nimport importlib\n"
              "def later():\n    importlib.import_module('vllm.engine')\n    __import__('vllm')\n"
              "import vllm_like\nfrom .vllm import y\n")
    found = vllm_imports("clora.core.models", source)
    assert sorted(found) == ["clora.core.models:1 imports `vllm`", "clora.core.models:2 imports `vllm.v1`",
                             "clora.core.models:3 imports `vllm`", "clora.core.models:6 imports `vllm.engine`",
                             "clora.core.models:7 imports `vllm`"]
