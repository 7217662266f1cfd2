"""Our decoders equal transformers' (float32): prefill logits, 32 decode steps' logits within 1e-4, and 64 greedy
tokens identical to ``generate(do_sample=False)`` — for tiny random GPT-2 and Llama models and the default
model (whose decode steps run on the low-bit copies of its Q4_1 and Q8_0 weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eoq.engine.model.attention import AttentionMetadata, PrefillChunk
from eoq.engine.types import EngineRequest, SamplingParams

from .conftest import make_core, run_to_end

TOL = 1e-4


class LogitsRecorder(nn.Module):
    """Wraps a decoder and keeps the logits of every step (the runner calls it like the model)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.steps: list[torch.Tensor] = []

    def forward(self, *args):
        logits = self.model(*args)
        self.steps.append(logits.clone())
        return logits

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def check_prefill_logits(core, hf_model, prompt: list[int]) -> None:
    """All prompt positions, computed by our model in one prefill, against transformers."""
    model = core.runner.model
    n = len(prompt)
    with torch.inference_mode():
        meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, 0)])
        ours = model(torch.tensor(prompt), torch.arange(n), core.runner.kv_caches, meta, torch.arange(n))
        ref = hf_model(torch.tensor([prompt])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL


def check_decode_logits_and_greedy(core, hf_model, prompt: list[int], steps: int) -> list[int]:
    """Greedy through the engine: each step's logits match transformers' on the same sequence; the tokens match
    transformers' ``generate``."""
    recorder = LogitsRecorder(core.runner.model)
    core.runner.model = recorder
    try:
        core.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=steps, ignore_eos=True)))
        outs = run_to_end(core)["r"]
    finally:
        core.runner.model = recorder.model
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == steps
    full = prompt + tokens
    # Like our ignore_eos: transformers must not stop at (nor, as min_new_tokens would, suppress) the EOS token.
    hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        ref = hf_model(torch.tensor([full])).logits[0]  # (len, V)
        generated = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      do_sample=False, max_new_tokens=steps, pad_token_id=0)[0, len(prompt):].tolist()
    sampled = [logits for logits in recorder.steps if logits.shape[0]]  # prompt chunks before the last sample nothing
    assert len(sampled) == steps
    for i, logits in enumerate(sampled):  # step i predicts token i from position len(prompt) - 1 + i
        diff = (logits[0] - ref[len(prompt) - 1 + i]).abs().max().item()
        assert diff < TOL, f"step {i}: max abs diff {diff}"
    assert tokens == generated
    return tokens


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["eoq-kernels", "torch-ops"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_model_matches_transformers(family, cpu_kernels, tiny_llama, tiny_gpt2):
    checkpoint, hf_model = tiny_llama if family == "llama" else tiny_gpt2
    core = make_core(checkpoint, cpu_kernels=cpu_kernels)
    assert (core.runner.model.kernels is not None) == cpu_kernels
    prompt = prompt_ids(37)
    check_prefill_logits(core, hf_model, prompt)
    check_decode_logits_and_greedy(core, hf_model, prompt, steps=32)
    tokens = check_decode_logits_and_greedy(core, hf_model, prompt_ids(20, seed=1), steps=64)
    assert len(set(tokens)) > 1  # a real continuation, not one token repeated by a broken model


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["eoq-kernels", "torch-ops"])
def test_chunked_prefill_and_prefix_cache_match_transformers(tiny_llama, cpu_kernels):
    """A prompt prefilled in chunks (budget 16) and then re-prefilled from the prefix cache gives the same
    logits as transformers."""
    checkpoint, hf_model = tiny_llama
    core = make_core(checkpoint, max_num_batched_tokens=16, cpu_kernels=cpu_kernels)
    prompt = prompt_ids(70, seed=2)
    first = check_decode_logits_and_greedy(core, hf_model, prompt, steps=8)
    # Same prompt again: its full blocks come from the cache (64 of 70 tokens).
    recorder_core_tokens = check_decode_logits_and_greedy(core, hf_model, prompt, steps=8)
    assert recorder_core_tokens == first


@pytest.mark.e2e
def test_default_model_matches_transformers(default_checkpoint):
    from transformers import AutoModelForCausalLM

    from eoq.chat.prompt import ChatMessage, PromptBuilder
    from eoq.engine.model.checkpoint import load_tokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(default_checkpoint.path, dtype=torch.float32).eval()
    core = make_core(default_checkpoint.path, kv_cache_memory_gb=0.5, max_model_len=2048)
    # Its layers' weights are Q4_1 in the GGUF: every layer matmul has its 4-bit copy; the embedding, which is
    # also the LM head, is Q8_0: it has an 8-bit copy. The decode steps below (one token) run on them.
    linears = list(core.runner.model.linears())
    assert sum(lin._int4 is not None for lin in linears) == len(linears) - 1
    assert core.runner.model.lm_head._int4 is None and core.runner.model.lm_head._int8 is not None
    assert core.runner.model.small_step_tokens == 4  # one-token steps run all layers in one call
    prompts = PromptBuilder(load_tokenizer(default_checkpoint.path))
    prompt = prompts.render(None, [ChatMessage("user", "What is the capital of France?")])
    check_prefill_logits(core, hf_model, prompt)
    check_decode_logits_and_greedy(core, hf_model, prompt, steps=32)
    check_decode_logits_and_greedy(core, hf_model, prompt, steps=64)


@pytest.mark.e2e
def test_default_model_in_bfloat16_with_and_without_eoq_kernels(default_checkpoint):
    """bf16, as served: the kernels' engine and torch's ops agree on the greedy answer and on the first steps'
    logits within bf16 rounding (the kernels round once where torch rounds after each op)."""
    from eoq.chat.prompt import ChatMessage, PromptBuilder
    from eoq.engine.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(default_checkpoint.path)
    prompt = PromptBuilder(tokenizer).render(None, [ChatMessage("user", "What is the capital of France?")])
    results = {}
    for cpu_kernels in (True, False):
        core = make_core(default_checkpoint.path, dtype="bfloat16", kv_cache_memory_gb=0.1, max_model_len=2048,
                         cpu_kernels=cpu_kernels)
        recorder = LogitsRecorder(core.runner.model)
        core.runner.model = recorder
        core.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=8)))
        tokens = [t for o in run_to_end(core)["r"] for t in o.token_ids]
        results[cpu_kernels] = (tokens, [s for s in recorder.steps if s.shape[0]])
    (ours, ours_logits), (torchs, torch_logits) = results[True], results[False]
    assert "Paris" in tokenizer.decode(ours)
    assert ours == torchs
    for a, b in zip(ours_logits, torch_logits):
        assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
