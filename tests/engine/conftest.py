"""Engine fixtures: tiny random-weight GPT-2 and Llama checkpoints built here (no download), sharing the default
model's tokenizer so detokenization is real, and engine cores over them in float32."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from eoq.engine.builder import build_engine_core
from eoq.engine.core import EngineCore
from eoq.engine.types import EngineConfig, EngineRequest, FinishReason, RequestOutput, SamplingParams

VOCAB = 49152  # the default model's tokenizer


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.3)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2,
               initializer_range=0.3)
    cfg.update(overrides)
    return GPT2Config(**cfg)


def save_checkpoint(hf_model, tokenizer_dir: Path, out: Path) -> Path:
    hf_model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(default_checkpoint) -> Path:
    return default_checkpoint.path


def _build(kind: str, tokenizer_dir: Path, out: Path, seed: int = 0):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()) if kind == "llama" else GPT2LMHeadModel(tiny_gpt2_config())
    model.eval()
    save_checkpoint(model, tokenizer_dir, out)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    """(checkpoint dir, the transformers model) of a tiny random Llama."""
    out = tmp_path_factory.mktemp("tiny-llama")
    return out, _build("llama", tokenizer_dir, out)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("tiny-gpt2")
    return out, _build("gpt2", tokenizer_dir, out)


@pytest.fixture(scope="session")
def tiny_llama_on_4bit_grid(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama whose projections' weights lie on a 4-bit grid, as a Q4_1 checkpoint (the default model's
    GGUF) holds them: per group of 32 inputs, min + q * step with q in 0..15. In float32 each projection then keeps
    an exact 4-bit copy, in rows and in panels, and drops its float32 weight."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                groups = p.view(p.shape[0], -1, 32)
                lo = groups.amin(-1, keepdim=True)
                step = (groups.amax(-1, keepdim=True) - lo) / 15
                groups.copy_(lo + ((groups - lo) / step).round() * step)
    return save_checkpoint(model, tokenizer_dir, tmp_path_factory.mktemp("tiny-llama-q4"))


def make_core(checkpoint: Path, **overrides) -> EngineCore:
    """An engine core in float32 with float32 activations (``activation_quantization="off"``: on a CPU without fast
    bfloat16 ``auto`` would take int8 ones for low-bit weights, and these tests compare float32 exactly); tests of
    int8 activations ask for them."""
    cfg = dict(checkpoint=checkpoint, model_name=checkpoint.name, dtype="float32", kv_cache_memory_gb=0.002,
               max_num_seqs=32, max_num_batched_tokens=256, activation_quantization="off")
    cfg.update(overrides)
    core, _ = build_engine_core(EngineConfig(**cfg))
    return core


def run_to_end(core: EngineCore, max_steps: int = 100_000) -> dict[str, list[RequestOutput]]:
    """Step until idle; every request's outputs in order."""
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return outs
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish in time")


def generate(core: EngineCore, prompt: list[int], **sampling) -> RequestOutput:
    """Run one request alone; returns a synthetic output with all its tokens/text and the finish reason."""
    core.add_request(EngineRequest("solo", list(prompt), SamplingParams(**sampling)))
    outs = run_to_end(core)["solo"]
    return merge(outs)


def merge(outs: list[RequestOutput]) -> RequestOutput:
    last = outs[-1]
    logprobs = None if outs[0].logprobs is None else [lp for o in outs for lp in o.logprobs]
    return RequestOutput(last.request_id, [t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                         last.finished, last.finish_reason, last.num_prompt_tokens, last.num_completion_tokens,
                         last.num_cached_tokens, last.timings, last.error, last.error_is_invalid_argument,
                         last.index, last.last, logprobs,
                         next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None))


__all__ = ["FinishReason", "generate", "make_core", "merge", "run_to_end"]


def cpu_flags() -> set[str]:
    """This x86-64 CPU's feature flags (``/proc/cpuinfo``); empty elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        return set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
                   .split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def _kernel_builds() -> list[str]:
    """The ``-march`` levels to build eoq's CPU kernels for: this machine's, and on x86-64 each older branch of
    ``csrc/simd.h`` it can run (AVX2 under AVX-512, the generic vectors under AVX2), so every branch this machine
    can execute is tested here, not only the one its own build takes; under AVX-512 with VNNI also AVX-512 without
    it (``x86-64-v4``: the int8 panels' vpmaddubsw on 512-bit registers, ``csrc/x8_gemm.cpp``)."""
    builds = ["native"]
    flags = cpu_flags()
    if "avx512f" in flags and {"avx2", "fma"} <= flags:
        builds.append("x86-64-v3")
    if "avx512f" in flags or {"avx2", "fma"} <= flags:
        builds.append("x86-64")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:  # last: the fidelity tests take the first two
        builds.append("x86-64-v4")
    return builds


@pytest.fixture(scope="session", params=_kernel_builds())
def cpu_kernels_lib(request, tmp_path_factory):
    """eoq's CPU kernels, built once a session into a temporary folder for each ``-march`` of _kernel_builds."""
    from eoq.engine.model.kernels.bindings import CpuKernels
    from eoq.engine.model.kernels.build import build

    lib = CpuKernels(build(tmp_path_factory.mktemp("kernels"), march=request.param))
    expected = {"x86-64-v4": "avx512", "x86-64-v3": "avx2", "x86-64": "generic"}.get(request.param)
    assert expected in (None, lib.isa), f"-march={request.param} built the {lib.isa} branch"
    return lib
