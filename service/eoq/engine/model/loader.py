"""Turning a checkpoint folder into one of our decoders: read the weights, build, move, prepare."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PretrainedConfig

from eoq.engine.model.base import DecoderModel
from eoq.engine.model.checkpoint import SUPPORTED_MODEL_TYPES
from eoq.engine.model.gpt2 import GPT2Decoder
from eoq.engine.model.kernels import CpuKernels
from eoq.engine.model.llama import LlamaDecoder
from eoq.errors import ConfigError

log = logging.getLogger(__name__)

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
                state: dict[str, torch.Tensor], int4_weights: str = "never", int4_max_tokens: int = 4,
                kernels: CpuKernels | None = None) -> DecoderModel:
    """``int4_weights`` (auto / always / never) and ``int4_max_tokens``: see ``DecoderModel.quantize_int4``;
    ``kernels``: eoq's CPU kernels, for the layers that have one."""
    model = FAMILIES[SUPPORTED_MODEL_TYPES[config.model_type]](config, max_positions)
    model.load_hf_state_dict(dict(state))
    if int4_weights != "never" and device.type != "cpu":
        log.info("int4 weights: the 4-bit kernels are CPU-only; %s runs every matmul in %s", device, dtype)
    elif int4_weights != "never" and int4_max_tokens > 0:
        made, total, nbytes = model.quantize_int4(int4_weights)  # from the float32 weights, before the cast
        if made:
            log.info("int4 weights (%s): 4-bit copies of %d of %d matmuls (%d MiB more), used by steps of <= %d "
                     "tokens", int4_weights, made, total, nbytes >> 20, int4_max_tokens)
        elif int4_weights == "auto":
            log.info("int4 weights (auto): the checkpoint's weights are not 4-bit; every matmul runs in %s", dtype)
    keep = model.float32_tensors()  # norm weights and RoPE tables stay float32
    model.to(device=device, dtype=dtype)
    model.restore_float32(keep, device)
    model.eval()
    model.prepare(dtype, int4_max_tokens, kernels)
    return model
