"""Turning a checkpoint folder into one of our decoders: read the weights, build, move, prepare."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import PretrainedConfig

from eoq.engine.model.base import DecoderModel
from eoq.engine.model.checkpoint import SUPPORTED_MODEL_TYPES
from eoq.engine.model.gpt2 import GPT2Decoder
from eoq.engine.model.linear import Int8Activations
from eoq.engine.model.llama import LlamaDecoder
from eoq.engine.model.ops import TORCH_OPS, TorchOps
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
                state: dict[str, torch.Tensor], quantized_weights: str = "never", quantized_max_tokens: int = 4,
                ops: TorchOps = TORCH_OPS, int8_activations: Int8Activations = Int8Activations.OFF,
                decode_panels_max_tokens: int = sys.maxsize) -> DecoderModel:
    """``quantized_weights`` (auto / int4 / never) and ``quantized_max_tokens``: see ``DecoderModel.quantize``;
    ``ops``: torch's or eoq's CPU kernels (``ops.select_ops``); ``int8_activations``, ``decode_panels_max_tokens``:
    which of the low-bit copies' steps take int8 activations (``device.select_int8_activations``,
    ``device.decode_panels_max_tokens``)."""
    model = FAMILIES[SUPPORTED_MODEL_TYPES[config.model_type]](config, max_positions)
    model.load_hf_state_dict(dict(state))
    quantize = quantized_weights != "never" and quantized_max_tokens > 0
    if quantize and device.type != "cpu":
        log.info("quantized weights: the low-bit kernels are CPU-only; on %s every matmul runs in %s", device, dtype)
        quantize = False
    if quantize:
        model.quantize(quantized_weights)  # from the float32 weights, before the cast
    keep = model.float32_tensors()  # norm weights and RoPE tables stay float32
    model.to(device=device, dtype=dtype)
    model.restore_float32(keep, device)
    model.eval()
    model.prepare(dtype, quantized_max_tokens, ops, int8_activations, decode_panels_max_tokens)
    if quantize:
        _log_quantized(model, quantized_weights, quantized_max_tokens, dtype)
    return model


def _log_quantized(model: DecoderModel, mode: str, max_tokens: int, dtype: torch.dtype) -> None:
    linears = list(model.linears())
    kinds = {"4-bit": sum(lin.int4 is not None for lin in linears),
             "8-bit": sum(lin.int8 is not None for lin in linears)}
    if not any(kinds.values()):
        log.info("quantized weights (%s): none (the checkpoint's weights are not low-bit, or eoq's CPU kernels are "
                 "missing); every matmul runs in %s", mode, dtype)
        return
    panels = sum(lin.panels_every_step for lin in linears)
    decode_panels = sum(lin.lowbit_panels is not None and not lin.panels_every_step for lin in linears)
    panels_limit = min(lin.decode_panels_max_tokens for lin in linears)
    if panels:
        exact = f"; {panels} of them exact, running every bigger step too in place of their float32 weights"
    elif decode_panels:
        up_to = f" (up to {panels_limit} tokens)" if panels_limit < sys.maxsize else ""
        exact = f"; {decode_panels} of them exact, in panels too for the bigger decode steps{up_to}"
    else:
        exact = ""
    int8 = {lin.int8_activations for lin in linears} - {Int8Activations.OFF}
    log.info("quantized weights (%s): %s copies of %d matmuls (%d MiB), used by steps of <= %d tokens%s%s", mode,
             " and ".join(f"{n} {k}" for k, n in kinds.items() if n), len(linears),
             sum(lin.quantized_bytes() for lin in linears) >> 20, max_tokens, exact,
             f"; int8 activations in {' and '.join(sorted(m.value for m in int8))} (integer dot products: "
             f"{model.ops.kernels.int8_dot_isa})" if int8 else "; float32 activations")
