"""The KV cache's element type (``--kv-cache-dtype``): bfloat16 beside a float32 model halves the bytes a token takes
(twice the tokens a budget holds, half the bytes decode attention reads), with keys and values rounded once when
written and widened exactly where they are read, on every path (eoq's kernels, the one-call step, torch's ops)."""

from __future__ import annotations

import pytest
import torch

from eoq.engine.builder import build_engine_core
from eoq.engine.device import select_kv_cache_dtype
from eoq.engine.types import EngineConfig, EngineRequest, SamplingParams
from eoq.errors import ConfigError

from .conftest import _kernel_builds, make_core, merge, run_to_end
from .test_fidelity import prompt_ids
from .test_small_steps import both_paths

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("setting, dtype, int8_run, expected", [
    ("auto", F32, True, BF16),  # auto on a CPU without fast bfloat16 (int8 activations run): a 16-bit cache
    ("auto", F32, False, F32),  # float32 exact (activations off, or no low-bit weights): the cache too
    ("auto", BF16, False, BF16),
    ("auto", BF16, True, BF16),  # --activation-quantization int8 on a bfloat16 machine
    ("auto", F16, False, F16),
    ("bfloat16", F32, False, BF16),
    ("float32", F32, True, F32),
    ("bfloat16", BF16, False, BF16),
])
def test_the_cache_dtype_for_each_setting(setting, dtype, int8_run, expected) -> None:
    assert select_kv_cache_dtype(setting, dtype, int8_run) is expected


@pytest.mark.parametrize("setting, dtype, message", [
    ("float32", BF16, "wider than the model's bfloat16"),
    ("bfloat16", F16, "beside a float16 model"),
    ("float8", F32, "--kv-cache-dtype 'float8': use auto, float32 or bfloat16"),
])
def test_a_cache_dtype_that_cannot_serve_is_refused_with_the_reason(setting, dtype, message) -> None:
    with pytest.raises(ConfigError, match=message):
        select_kv_cache_dtype(setting, dtype, False)


def test_a_bfloat16_cache_holds_twice_the_tokens_of_a_float32_one(tiny_llama) -> None:
    checkpoint, _ = tiny_llama
    infos = {}
    for kv in ("float32", "bfloat16"):
        core, infos[kv] = build_engine_core(EngineConfig(checkpoint=checkpoint, model_name="tiny", dtype="float32",
                                                         kv_cache_memory_gb=0.002, kv_cache_dtype=kv,
                                                         activation_quantization="off"))
        assert core.runner.kv_cache.dtype == getattr(torch, kv) and infos[kv].kv_cache_dtype == kv
    assert infos["bfloat16"].kv_bytes_per_token * 2 == infos["float32"].kv_bytes_per_token
    assert infos["bfloat16"].kv_cache_tokens == 2 * infos["float32"].kv_cache_tokens
    assert infos["float32"].dtype == infos["bfloat16"].dtype == "float32"


@pytest.mark.parametrize("activations", ["off", "int8"])
@pytest.mark.parametrize("march", _kernel_builds())
def test_the_one_call_step_over_a_bfloat16_cache(tiny_llama_on_4bit_grid, march, activations):
    """The one call (row kernels at 3 tokens, panels at 9) writes and reads a bfloat16 cache as the layers do."""
    for lengths in ([7, 30, 12], [4 + 5 * i for i in range(9)]):
        core = make_core(tiny_llama_on_4bit_grid, activation_quantization=activations, kv_cache_dtype="bfloat16",
                         kernel_march=march)
        assert core.runner.kv_cache.dtype == torch.bfloat16
        calls, one_call, layer_by_layer = both_paths(core, lengths)
        assert calls == 1 and one_call.dtype == torch.float32 and torch.equal(one_call, layer_by_layer)


def _answers(core, sampling) -> dict[str, tuple[list[int], list[float]]]:
    for i, (n, m) in enumerate([(12, 9), (40, 6), (3, 12), (27, 7), (70, 5)]):  # prompts of several blocks, chunked
        core.add_request(EngineRequest(f"q{i}", prompt_ids(n, seed=90 + i), SamplingParams(max_tokens=m, **sampling)))
    return {rid: (merge(outs).token_ids, [lp.logprob for o in outs for lp in o.logprobs])
            for rid, outs in run_to_end(core).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kernels_and_torch_ops_agree_over_a_bfloat16_cache(request, family: str) -> None:
    """A float32 model over a bfloat16 cache, prompts split into chunks (a budget of 16 tokens a step): eoq's kernels
    (Llama's RoPE with the cache writes, decode attention) and torch's ops (index_copy_, SDPA over the widened
    blocks) give the same greedy tokens, their logprobs within float32's rounding."""
    checkpoint, _ = request.getfixturevalue(f"tiny_{family}")
    sampling = dict(ignore_eos=True, temperature=0.0, logprobs=True)
    kernels = _answers(make_core(checkpoint, kv_cache_dtype="bfloat16", max_num_batched_tokens=16), sampling)
    torch_ops = _answers(make_core(checkpoint, kv_cache_dtype="bfloat16", max_num_batched_tokens=16,
                                   cpu_kernels=False), sampling)
    exact = _answers(make_core(checkpoint, kv_cache_dtype="float32", max_num_batched_tokens=16), sampling)
    assert kernels.keys() == torch_ops.keys() == exact.keys()
    rounded = 0.0
    for rid in kernels:
        assert kernels[rid][0] == torch_ops[rid][0], rid
        torch.testing.assert_close(kernels[rid][1], torch_ops[rid][1], atol=1e-4, rtol=1e-4)
        rounded = max(rounded, max(abs(a - b) for a, b in zip(kernels[rid][1], exact[rid][1])))
    assert rounded > 0  # the cache really held bfloat16: its logprobs differ from a float32 cache's
