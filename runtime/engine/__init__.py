"""The engine: everything that imports vLLM or runs inside its processes, in one folder.

- `protocol`: what serving sees (`Engine`, `EngineResponse`, the errors); no vLLM.
- `config`: the `vllm serve` arguments and environment from our settings; adapter validation.
- `client`: vLLM's app called in-process (ASGI), without a socket.
- `manager`: vLLM's frontend assembled in this process, its engine core supervised (imports vLLM).
- `plugin`, `punica`, `lora_ops`: the grouped CPU LoRA path installed into vLLM's processes.
- `child`: what each process vLLM spawns from ours does first (logs, process group, parent watch).

Importing this package imports no vLLM: the manager imports it inside its functions, and only
vLLM's processes load the plugin.
"""

from clora.runtime.engine.protocol import AdapterRejected, ChatAnswer, Engine, EngineResponse, EngineUnavailable

__all__ = ["AdapterRejected", "ChatAnswer", "Engine", "EngineResponse", "EngineUnavailable"]
