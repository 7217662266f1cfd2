"""Assembling an engine core from settings: device and dtype, the model, and a KV cache sized from a budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from eoq.config import default_cache_dir
from eoq.engine.block_manager import BlockManager
from eoq.engine.core import EngineCore
from eoq.engine.device import (
    cpu_has_amx,
    cpu_has_fast_bf16,
    decode_panels_max_tokens,
    dtype_name,
    select_device,
    select_dtype,
    select_int8_activations,
    select_kv_cache_dtype,
    tune_cpu_allocator,
)
from eoq.engine.model.checkpoint import context_length, load_config, load_tokenizer
from eoq.engine.model.kernels import load_cpu_kernels
from eoq.engine.model.kernels.bindings import CpuKernels
from eoq.engine.model.loader import build_model, read_state_dict
from eoq.engine.model.ops import TorchOps, select_ops
from eoq.engine.runner import ModelRunner
from eoq.engine.scheduler import Scheduler
from eoq.engine.structured import GrammarCompiler
from eoq.engine.types import EngineConfig, ModelInfo
from eoq.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3
DEFAULT_CPU_KV_GB = 1.0
DEFAULT_GPU_KV_FRACTION = 0.85  # of the GPU memory still free once the weights are loaded


def eos_token_ids(checkpoint: Path, tokenizer: PreTrainedTokenizerBase, config) -> set[int]:
    """The model's end tokens: the tokenizer's EOS, the config's and the generation config's."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(tokenizer.eos_token_id)
    add(getattr(config, "eos_token_id", None))
    if (checkpoint / "generation_config.json").is_file():
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(checkpoint).eos_token_id)
    return ids


def build_engine_core(cfg: EngineConfig) -> tuple[EngineCore, ModelInfo]:
    t0 = time.monotonic()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    dtype = select_dtype(cfg.dtype, device)
    if device.type == "cpu" and not tune_cpu_allocator():
        log.info("could not tune the C allocator (not glibc?): large step temporaries may be slower")
    config = load_config(cfg.checkpoint)
    tokenizer = load_tokenizer(cfg.checkpoint)
    model_len = context_length(config)
    if cfg.max_model_len is not None:
        if cfg.max_model_len > model_len:
            raise ConfigError(f"--max-model-len {cfg.max_model_len} exceeds the model's context ({model_len} tokens)")
        model_len = cfg.max_model_len
    state = read_state_dict(cfg.checkpoint)
    ops = _ops(cfg, device, dtype)  # torch's ops or eoq's CPU kernels: chosen here, once
    int8_activations = select_int8_activations(cfg.activation_quantization, device, dtype, cpu_has_fast_bf16())
    model = build_model(config, model_len, device, dtype, state, cfg.quantized_weights, cfg.quantized_max_tokens,
                        ops, int8_activations, decode_panels_max_tokens(int8_activations, cpu_has_amx()))
    del state
    kv_dtype = select_kv_cache_dtype(cfg.kv_cache_dtype, dtype, any(
        lin.runs_int8_activations(1, decode=True) for lin in model.linears()))

    bytes_per_token = model.kv_spec.bytes_per_token(kv_dtype)
    budget = _kv_budget_bytes(cfg, device)
    graphs = _decode_graphs(cfg.decode_graphs, device)
    # With decode graphs one block of the budget is their null block (padding rows write there).
    num_blocks = int(budget // (bytes_per_token * cfg.block_size)) - (graphs != "off")
    capacity = num_blocks * cfg.block_size
    if capacity < model_len:
        need_gb = model_len * bytes_per_token / GiB
        raise ConfigError(
            f"the KV cache budget ({budget / GiB:.3g} GiB) holds {capacity} tokens, less than one full-length "
            f"sequence ({model_len} tokens at {bytes_per_token} bytes each): raise --kv-cache-memory-gb to at "
            f"least {need_gb:.3g} or lower --max-model-len"
        )
    eos = eos_token_ids(cfg.checkpoint, tokenizer, config) | set(cfg.extra_eos_token_ids)
    blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
    scheduler = Scheduler(blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
    runner = ModelRunner(model, num_blocks, cfg.block_size, device, dtype, cfg.seed, graphs, cfg.max_num_seqs,
                         kv_dtype)
    grammars = GrammarCompiler(tokenizer, model.vocab_size, cfg.grammar_cache_mb)  # xgrammar loads on first use
    core = EngineCore(runner, scheduler, tokenizer, frozenset(eos), grammars, cfg.max_grammar_compile_seconds)
    info = ModelInfo(
        name=cfg.model_name,
        architecture=model.architecture,
        context_length=model_len,
        dtype=dtype_name(dtype),
        device=str(device),
        vocab_size=model.vocab_size,
        kv_cache_tokens=capacity,
        kv_bytes_per_token=bytes_per_token,
        kv_cache_dtype=dtype_name(kv_dtype),
        eos_token_ids=tuple(sorted(eos)),
    )
    log.info(
        "model %s (%s) on %s in %s, context %d tokens, loaded in %.1f s; KV cache (%s) %.2f GiB = %d tokens "
        "(%d blocks of %d, %d bytes/token) = %d full-length or ~%d sequences of 1k tokens; %s threads; %s%s",
        info.name, info.architecture, info.device, info.dtype, model_len, time.monotonic() - t0, info.kv_cache_dtype,
        num_blocks * cfg.block_size * bytes_per_token / GiB, capacity, num_blocks, cfg.block_size, bytes_per_token,
        capacity // model_len, capacity // 1024, torch.get_num_threads(),
        ops.name,
        {"cuda": "; decode steps from CUDA graphs", "eager": "; padded decode steps (no graphs)"}.get(graphs, ""),
    )
    return core, info


def _decode_graphs(setting: str, device: torch.device) -> str:
    """The runner's ``decode_graphs`` for the ``--decode-graphs`` setting: ``auto`` = CUDA graphs on CUDA."""
    if setting not in ("auto", "off", "eager"):
        raise ConfigError(f"--decode-graphs {setting!r}: use auto, off or eager")
    if setting == "auto":
        return "cuda" if device.type == "cuda" else "off"
    return setting


def _ops(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> TorchOps:
    """eoq's CPU kernels where they run and are wanted (``--cpu-kernels``) and can be built, else torch's ops."""
    if not cfg.cpu_kernels or not CpuKernels.supports(device, dtype):
        return select_ops(None)
    return select_ops(load_cpu_kernels(cfg.kernel_cache_dir or default_cache_dir() / "kernels", cfg.kernel_march))


def _kv_budget_bytes(cfg: EngineConfig, device: torch.device) -> float:
    if cfg.kv_cache_memory_gb is not None:
        return cfg.kv_cache_memory_gb * GiB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free * DEFAULT_GPU_KV_FRACTION
    return DEFAULT_CPU_KV_GB * GiB
