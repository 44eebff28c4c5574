"""vLLM is imported by the engine manager (`clora.runtime.engine`) and, inside vLLM's own
processes, by our vLLM plugin (`lora_plugin`, `lora_punica`: the grouped CPU LoRA path), and by no
other module.

We use vLLM below its HTTP surface (its argument parser, `AsyncLLM`, `build_app`,
`init_app_state`, its punica wrapper), which a vLLM upgrade may change; with these importers, an
upgrade is their work, and every other module (the engine's config and client and the pure-torch
`lora_ops` included) loads without vLLM.
Modules are read as text (AST), never imported, so an import that only runs inside a function is
found too.
"""

from __future__ import annotations

import ast

from tests.test_layers import module_files

ENGINE = "clora.runtime.engine"
ALLOWED = {ENGINE, "clora.runtime.lora_plugin", "clora.runtime.lora_punica"}
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


def violations(sources: dict[str, str]) -> list[str]:
    """Every vLLM import outside the engine manager and the plugin."""
    return [problem for module, source in sorted(sources.items()) if module not in ALLOWED
            for problem in vllm_imports(module, source)]


def test_only_the_engine_manager_and_the_plugin_import_vllm():
    sources = {module: path.read_text() for module, path in module_files().items()}
    assert ALLOWED | {"clora.runtime.engine_config", "clora.runtime.engine_client", "clora.runtime.lora_ops"} \
        <= sources.keys()
    assert all(vllm_imports(module, sources[module]) for module in ALLOWED), "the checker finds their vLLM imports"
    assert violations(sources) == []


PLANTED = '''
import asyncio

async def build():
    from vllm.entrypoints import x
    return x
'''


def test_a_planted_vllm_import_inside_a_function_is_found():
    sources = {module: path.read_text() for module, path in module_files().items()}
    sources["clora.runtime.engine_client"] += PLANTED
    problems = violations(sources)
    assert len(problems) == 1 and problems[0].startswith("clora.runtime.engine_client:"), problems
    assert problems[0].endswith("imports `vllm.entrypoints`")


def test_every_form_of_import_is_found():
    source = ("import vllm\nimport vllm.v1 as v1\nfrom vllm import LLM\nimport importlib\n"
              "def later():\n    importlib.import_module('vllm.engine')\n    __import__('vllm')\n"
              "import vllm_like\nfrom .vllm import y\n")
    found = vllm_imports("clora.core.models", source)
    assert sorted(found) == ["clora.core.models:1 imports `vllm`", "clora.core.models:2 imports `vllm.v1`",
                             "clora.core.models:3 imports `vllm`", "clora.core.models:6 imports `vllm.engine`",
                             "clora.core.models:7 imports `vllm`"]
