"""Decode steps of a few tokens run every Llama layer in one call of eoq's CPU kernels (``csrc/llama_small.cpp``):
the same kernels in the same order as the layer-by-layer path, so the same logits, bit for bit."""

from __future__ import annotations

import pytest
import torch

from eoq.engine.types import EngineRequest, SamplingParams

from .conftest import _kernel_builds, make_core, merge, run_to_end, save_checkpoint, tiny_llama_config
from .test_fidelity import prompt_ids


def int4_core(checkpoint, dtype: str, activations: str = "off"):
    """An engine whose every projection has a 4-bit copy (rounded): steps of up to 4 tokens run on them, with
    float32 activations or (``activations="int8"``) int8 ones."""
    return make_core(checkpoint, dtype=dtype, quantized_weights="int4", quantized_max_tokens=4,
                     activation_quantization=activations)


def decode_step_inputs(core, lengths: list[int]):
    """Prefill requests of these prompt lengths; return the model inputs of the first decode-only step."""
    for i, n in enumerate(lengths):
        core.add_request(EngineRequest(f"r{i}", prompt_ids(n, seed=70 + i), SamplingParams(max_tokens=8)))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in core.requests.values()):
        core.step()
    out = core.scheduler.schedule()
    assert len(out.decodes) == len(lengths) and not out.prefills
    step = core.runner.prepare(out)
    return step.input_ids, step.positions, step.meta, step.logits_indices


@pytest.mark.parametrize("activations", ["off", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [[7], [40, 3], [18, 33, 5, 61]], ids=["1", "2", "4"])
def test_one_call_gives_the_layer_by_layer_logits(tiny_llama, dtype, lengths, activations):
    checkpoint, _ = tiny_llama
    core = int4_core(checkpoint, dtype, activations)
    model, runner = core.runner.model, core.runner
    assert model.small_step_tokens == 4
    assert model.layers[0].qkv.runs_int8_activations(4, decode=True) == (activations == "int8")
    ids, pos, meta, rows = decode_step_inputs(core, lengths)
    calls = []
    fused = model.ops.kernels.llama_layers_int4
    model.ops.kernels.llama_layers_int4 = lambda *a: calls.append(len(a)) or fused(*a)
    with torch.inference_mode():
        one_call = model(ids, pos, runner.kv_caches, meta, rows)
        model.small_step_tokens = 0
        layer_by_layer = model(ids, pos, runner.kv_caches, meta, rows)  # rewrites the same K/V into the cache
    assert len(calls) == 1
    assert torch.equal(one_call, layer_by_layer)


@pytest.mark.parametrize("march", _kernel_builds())
def test_one_call_gives_the_layer_by_layer_logits_with_int8_activations_on_each_branch(tiny_llama, march):
    """Int8 activations on each ISA branch this machine runs (VNNI, AVX2's vpmaddubsw, the generic vectors): the
    one call quantizes and multiplies exactly as the layers do."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint, quantized_weights="int4", quantized_max_tokens=4, activation_quantization="int8",
                     kernel_march=march)
    model, runner = core.runner.model, core.runner
    assert model.small_step_tokens == 4 and model.layers[0].down.runs_int8_activations(4, decode=True)
    ids, pos, meta, rows = decode_step_inputs(core, [18, 33, 5, 61])
    with torch.inference_mode():
        one_call = model(ids, pos, runner.kv_caches, meta, rows)
        model.small_step_tokens = 0
        layer_by_layer = model(ids, pos, runner.kv_caches, meta, rows)
    assert torch.equal(one_call, layer_by_layer)


def test_same_tokens_through_a_whole_batch(tiny_llama):
    """Five requests: their decodes run 5 at a time (layer by layer), then 4 and fewer (one call) as they end."""
    checkpoint, _ = tiny_llama

    def answers(core):
        for i, (n, m) in enumerate([(12, 30), (40, 9), (3, 22), (27, 14), (55, 5)]):
            core.add_request(EngineRequest(f"q{i}", prompt_ids(n, seed=80 + i),
                                           SamplingParams(max_tokens=m, ignore_eos=True)))
        return {rid: merge(outs).token_ids for rid, outs in run_to_end(core).items()}

    fused = int4_core(checkpoint, "float32")
    plain = int4_core(checkpoint, "float32")
    plain.runner.model.small_step_tokens = 0
    assert answers(fused) == answers(plain)


def test_projections_with_biases_run_layer_by_layer(tmp_path, tokenizer_dir):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    checkpoint = save_checkpoint(LlamaForCausalLM(tiny_llama_config(attention_bias=True)).eval(), tokenizer_dir,
                                 tmp_path / "biased")
    core = int4_core(checkpoint, "float32")
    assert core.runner.model.small_step_tokens == 0  # the one-call kernel has no biases
    core.add_request(EngineRequest("b", prompt_ids(9, seed=1), SamplingParams(max_tokens=3, ignore_eos=True)))
    assert len(merge(run_to_end(core)["b"]).token_ids) == 3
