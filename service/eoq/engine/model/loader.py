"""Turning a checkpoint folder into one of our decoders: read the weights, build, move, prepare."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig

from eoq.engine.model.base import DecoderModel
from eoq.engine.model.checkpoint import SUPPORTED_MODEL_TYPES
from eoq.engine.model.gpt2 import GPT2Decoder
from eoq.engine.model.llama import LlamaDecoder
from eoq.errors import ConfigError

FAMILIES: dict[str, type[DecoderModel]] = {"llama": LlamaDecoder, "gpt2": GPT2Decoder}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise ConfigError(f"{path}: no *.safetensors or pytorch_model*.bin weights")


def build_model(config: PretrainedConfig, max_positions: int, device: torch.device, dtype: torch.dtype,
                state: dict[str, torch.Tensor]) -> DecoderModel:
    model = FAMILIES[SUPPORTED_MODEL_TYPES[config.model_type]](config, max_positions)
    model.load_hf_state_dict(dict(state))
    keep = model.float32_tensors()  # norm weights and RoPE tables stay float32
    model.to(device=device, dtype=dtype)
    model.restore_float32(keep, device)
    model.eval()
    model.prepare(dtype)
    return model
