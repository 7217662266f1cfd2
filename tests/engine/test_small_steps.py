"""Decode steps run every Llama layer in one call of eoq's CPU kernels (``csrc/llama_small.cpp``): a few tokens on
the 4-bit row kernels, and in float32 with exact 4-bit copies (a Q4_1 checkpoint), or in bfloat16 with int8
activations on the panels (auto on an AVX-512 BF16 CPU), any number on the panels; the same
kernels in the same order as the layer-by-layer path, so the same logits, bit for bit."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch

from eoq.engine.model.linear import _onednn_packing_available
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


def counted_calls(model) -> list[int]:
    """The model's one-call kernel, wrapped to count its calls (appended to the list returned)."""
    calls = []
    fused = model.ops.kernels.llama_layers_int4
    model.ops.kernels.llama_layers_int4 = lambda *a: calls.append(len(a)) or fused(*a)
    return calls


def both_paths(core, lengths: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The logits of the first decode-only step of requests with these prompt lengths, run in one call and then
    layer by layer (rewriting the same K/V into the cache), and how many times the one-call kernel ran."""
    model, runner = core.runner.model, core.runner
    ids, pos, meta, rows = decode_step_inputs(core, lengths)
    calls = counted_calls(model)
    with torch.inference_mode():
        one_call = model(ids, pos, runner.kv_caches, meta, rows)
        model.one_call_tokens = 0
        layer_by_layer = model(ids, pos, runner.kv_caches, meta, rows)
    return len(calls), one_call, layer_by_layer


@pytest.mark.parametrize("activations", ["off", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lengths", [[7], [40, 3], [18, 33, 5, 61]], ids=["1", "2", "4"])
def test_one_call_gives_the_layer_by_layer_logits(tiny_llama, dtype, lengths, activations):
    checkpoint, _ = tiny_llama
    core = int4_core(checkpoint, dtype, activations)
    model = core.runner.model
    assert model.one_call_tokens == 4
    assert model.layers[0].qkv.runs_int8_activations(4, decode=True) == (activations == "int8")
    calls, one_call, layer_by_layer = both_paths(core, lengths)
    assert calls == 1
    assert torch.equal(one_call, layer_by_layer)


@pytest.mark.parametrize("march", _kernel_builds())
def test_one_call_gives_the_layer_by_layer_logits_with_int8_activations_on_each_branch(tiny_llama, march):
    """Int8 activations on each ISA branch this machine runs (VNNI, AVX2's vpmaddubsw, the generic vectors): the
    one call quantizes and multiplies exactly as the layers do."""
    checkpoint, _ = tiny_llama
    core = make_core(checkpoint, quantized_weights="int4", quantized_max_tokens=4, activation_quantization="int8",
                     kernel_march=march)
    model = core.runner.model
    assert model.one_call_tokens == 4 and model.layers[0].down.runs_int8_activations(4, decode=True)
    calls, one_call, layer_by_layer = both_paths(core, [18, 33, 5, 61])
    assert calls == 1 and torch.equal(one_call, layer_by_layer)


MANY = [3 + (7 * i) % 23 for i in range(32)]  # 32 prompts of 3 to 25 tokens


@pytest.mark.parametrize("activations", ["off", "int8"])
@pytest.mark.parametrize("lengths", [[18, 33, 5, 61, 9], [4 + i for i in range(9)], MANY], ids=["5", "9", "32"])
def test_any_decode_step_runs_in_one_call_on_the_panels(tiny_llama_on_4bit_grid, lengths, activations):
    """In float32 with exact 4-bit copies, decode steps beyond the row kernels' 4 tokens run the panels in the one
    call, as the layers run them: the same logits as layer by layer."""
    core = make_core(tiny_llama_on_4bit_grid, activation_quantization=activations)
    model = core.runner.model
    assert model.row_tokens == 4 and model.one_call_tokens == sys.maxsize
    assert all(p.lowbit_panels is not None and p.weight.numel() == 0 for la in model.layers for p in la.projections)
    assert model.layers[0].qkv.runs_int8_activations(len(lengths), decode=True) == (activations == "int8")
    calls, one_call, layer_by_layer = both_paths(core, lengths)
    assert calls == 1
    assert torch.equal(one_call, layer_by_layer)


@pytest.mark.parametrize("activations", ["off", "int8"])
@pytest.mark.parametrize("march", _kernel_builds())
def test_the_panels_in_one_call_on_each_branch(tiny_llama_on_4bit_grid, march, activations):
    """Each ISA branch this machine runs: a step of 9 decodes on the panels, in one call and layer by layer."""
    core = make_core(tiny_llama_on_4bit_grid, activation_quantization=activations, kernel_march=march)
    calls, one_call, layer_by_layer = both_paths(core, [4 + 5 * i for i in range(9)])
    assert calls == 1 and torch.equal(one_call, layer_by_layer)


def bf16_machine_core(checkpoint, march: str = "native"):
    """An engine in bfloat16 with ``--activation-quantization auto`` decided as on a CPU with AVX-512 BF16 and no AMX
    (a Zen 4 or 5): int8 activations in the decode steps beyond the row kernels (``DECODE_PANELS``)."""
    with mock.patch("eoq.engine.builder.cpu_has_fast_bf16", return_value=True), \
            mock.patch("eoq.engine.builder.cpu_has_amx", return_value=False):
        return make_core(checkpoint, dtype="bfloat16", activation_quantization="auto", kernel_march=march)


@pytest.mark.parametrize("march", _kernel_builds())
@pytest.mark.parametrize("lengths", [[18, 33, 5, 61, 9], MANY], ids=["5", "32"])
def test_bfloat16_decode_steps_beyond_the_row_kernels_run_the_int8_panels_in_one_call(tiny_llama_on_4bit_grid,
                                                                                      lengths, march):
    """``DECODE_PANELS`` (auto on an AVX-512 BF16 machine): a bfloat16 model keeps its 4-bit panels beside oneDNN's
    weight, and every decode step runs in one call — the row kernels with float32 arithmetic up to 4 tokens, the
    panels with int8 activations beyond (the rows widened to float32 and rounded back, as the layers do): the same
    logits as layer by layer, on each ISA branch; prompts stay on the dtype's path."""
    core = bf16_machine_core(tiny_llama_on_4bit_grid, march)
    model = core.runner.model
    assert model.row_tokens == 4 and model.one_call_tokens == sys.maxsize
    qkv = model.layers[0].qkv
    assert qkv.lowbit_panels is not None and not qkv.runs_int8_activations(4, decode=True)
    assert qkv.runs_int8_activations(5, decode=True) and not qkv.runs_int8_activations(64, decode=False)
    calls, one_call, layer_by_layer = both_paths(core, lengths)
    assert calls == 1 and torch.equal(one_call, layer_by_layer)


def amx_core(checkpoint):
    """An engine in bfloat16 with ``--activation-quantization auto`` decided as on an AMX CPU, its decode panels'
    limit lowered to 8 rows."""
    with mock.patch("eoq.engine.builder.cpu_has_fast_bf16", return_value=True), \
            mock.patch("eoq.engine.builder.cpu_has_amx", return_value=True), \
            mock.patch("eoq.engine.device.AMX_DECODE_PANELS_MAX_TOKENS", 8):
        return make_core(checkpoint, dtype="bfloat16", activation_quantization="auto")


def test_amx_runs_the_int8_panels_in_one_call_up_to_its_limit_then_onednn(tiny_llama_on_4bit_grid):
    """On an AMX CPU ``DECODE_PANELS`` stops at ``AMX_DECODE_PANELS_MAX_TOKENS`` rows (here lowered to 8): decode
    steps up to it run in one call, the panels with int8 activations beyond the row kernels (the same logits as
    layer by layer); bigger ones run layer by layer on the dtype's weight (oneDNN's AMX tiles), float activations."""
    core = amx_core(tiny_llama_on_4bit_grid)
    model = core.runner.model
    assert model.row_tokens == 4 and model.one_call_tokens == 8
    qkv = model.layers[0].qkv
    assert all(lin.decode_panels_max_tokens == 8 for lin in model.linears())
    assert qkv.runs_int8_activations(8, decode=True) and not qkv.runs_int8_activations(9, decode=True)
    calls, one_call, layer_by_layer = both_paths(core, [4 + 3 * i for i in range(8)])
    assert calls == 1 and torch.equal(one_call, layer_by_layer)
    core = amx_core(tiny_llama_on_4bit_grid)
    ids, pos, meta, rows = decode_step_inputs(core, [4 + 3 * i for i in range(9)])
    calls = counted_calls(core.runner.model)
    with torch.inference_mode():
        logits = core.runner.model(ids, pos, core.runner.kv_caches, meta, rows)
    assert calls == [] and logits.shape == (9, model.vocab_size)
    # bfloat16's matmuls (oneDNN's where it packs): float32's logits within bfloat16's rounding
    reference = make_core(tiny_llama_on_4bit_grid)
    ids, pos, meta, rows = decode_step_inputs(reference, [4 + 3 * i for i in range(9)])
    with torch.inference_mode():
        exact = reference.runner.model(ids, pos, reference.runner.kv_caches, meta, rows)
    assert float((logits - exact).norm() / exact.norm()) < 0.05  # 0.022 measured


def test_bfloat16_steps_beyond_the_row_kernels_without_int8(tiny_llama_on_4bit_grid):
    """With ``--activation-quantization off`` a bfloat16 model's bigger decode steps run the dtype's own matmul:
    where oneDNN packs bfloat16 (AVX-512) its weight, layer by layer, only the row kernels' steps in one call; where it
    does not (AVX2) the exact copy's float32 panels, in one call like float32's, the same logits as layer by layer."""
    core = make_core(tiny_llama_on_4bit_grid, dtype="bfloat16")
    model = core.runner.model
    assert model.row_tokens == 4
    if _onednn_packing_available():
        assert model.one_call_tokens == 4
        ids, pos, meta, rows = decode_step_inputs(core, [4 + i for i in range(6)])
        calls = counted_calls(model)
        with torch.inference_mode():
            logits = model(ids, pos, core.runner.kv_caches, meta, rows)
        assert calls == [] and logits.shape == (6, model.vocab_size) and bool(logits.isfinite().all())
    else:
        assert model.one_call_tokens == sys.maxsize
        calls, one_call, layer_by_layer = both_paths(core, [4 + i for i in range(6)])
        assert calls == 1 and torch.equal(one_call, layer_by_layer)


def test_the_kernel_refuses_panel_steps_it_has_no_panels_for(tiny_llama):
    """Rounded 4-bit copies have no panels: a step beyond the row kernels is refused with a code, not run on null
    weights (the model never asks it: its one_call_tokens is the row kernels' limit there)."""
    checkpoint, _ = tiny_llama
    core = int4_core(checkpoint, "float32")
    model, runner = core.runner.model, core.runner
    assert model.one_call_tokens == model.row_tokens == 4
    ids, pos, meta, rows = decode_step_inputs(core, [4 + i for i in range(5)])
    model.one_call_tokens = sys.maxsize
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"eoq_llama_layers_int4 refused .*code 3"):
        model(ids, pos, runner.kv_caches, meta, rows)


@pytest.mark.parametrize("grid", [False, True], ids=["rounded-copies", "q4-checkpoint"])
def test_same_tokens_through_a_whole_batch(tiny_llama, tiny_llama_on_4bit_grid, grid):
    """Five requests: their decodes run 5 at a time, then 4 and fewer as they end; with rounded copies the 5 run layer
    by layer and the rest in one call, with a Q4_1 checkpoint all in one call (panels, then row kernels)."""
    checkpoint = tiny_llama_on_4bit_grid if grid else tiny_llama[0]

    def answers(core):
        for i, (n, m) in enumerate([(12, 30), (40, 9), (3, 22), (27, 14), (55, 5)]):
            core.add_request(EngineRequest(f"q{i}", prompt_ids(n, seed=80 + i),
                                           SamplingParams(max_tokens=m, ignore_eos=True)))
        return {rid: merge(outs).token_ids for rid, outs in run_to_end(core).items()}

    fused = make_core(checkpoint) if grid else int4_core(checkpoint, "float32")
    plain = make_core(checkpoint) if grid else int4_core(checkpoint, "float32")
    assert fused.runner.model.one_call_tokens == (sys.maxsize if grid else 4)
    plain.runner.model.one_call_tokens = 0
    assert answers(fused) == answers(plain)


def test_projections_with_biases_run_layer_by_layer(tmp_path, tokenizer_dir):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    checkpoint = save_checkpoint(LlamaForCausalLM(tiny_llama_config(attention_bias=True)).eval(), tokenizer_dir,
                                 tmp_path / "biased")
    core = int4_core(checkpoint, "float32")
    assert core.runner.model.one_call_tokens == 0  # the one-call kernel has no biases
    core.add_request(EngineRequest("b", prompt_ids(9, seed=1), SamplingParams(max_tokens=3, ignore_eos=True)))
    assert len(merge(run_to_end(core)["b"]).token_ids) == 3
