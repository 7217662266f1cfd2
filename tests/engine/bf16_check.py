"""The default model in bfloat16 against float32 and transformers' bfloat16, on the paths of this process.

Run in the test process for this machine's own paths, or as ``python -m tests.engine.bf16_check MARCH`` in a
process whose environment narrows torch and oneDNN to another CPU kind's instruction set (``AVX2_ENV``): then
eoq's kernels are built for that ``-march`` too, and the model takes the paths such a machine takes (bfloat16
matmuls through ``F.linear``, not oneDNN's bfloat16 path). That runs those branches here; it does not prove the
other hardware (its caches, its lack of native bfloat16 instructions) right.

Measures, for eoq with its CPU kernels and with torch's ops:
- ``agreement``: over ``PROMPTS``, the share of float32's greedy tokens that bfloat16 predicts too, teacher
  forced (each position sees float32's tokens before it, so one early difference does not count twice);
- ``answers``: the greedy answers to ``REFERENCE_QUESTIONS`` (to the end-of-answer token or ``ANSWER_TOKENS``),
  with transformers' own bfloat16 ``generate`` answers in ``transformers_answers``; where an answer differs from
  transformers', ``tie_gaps`` holds float32's logit of transformers' token minus eoq's at the first difference
  (transformers in float32 over the tokens both answers share): near 0, the two are a tie that bfloat16's rounding
  breaks either way (None where the answers are equal);
- ``first_logits``: the first answer token's logits, for the kernels and torch's ops to be compared.
"""

from __future__ import annotations

import json
import sys

import torch

from eoq.chat.prompt import ChatMessage, PromptBuilder
from eoq.engine.model.attention import AttentionMetadata, PrefillChunk
from eoq.engine.model.checkpoint import load_tokenizer, resolve_checkpoint
from eoq.engine.types import EngineRequest, SamplingParams

# An AVX2-only CPU's instruction set for torch's own kernels, oneDNN and MKL (they read these at start).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

REFERENCE_QUESTIONS = ["What is the capital of France?", "What is the capital of Germany?",
                       "Who wrote Romeo and Juliet?"]
PROMPTS = REFERENCE_QUESTIONS + [
    "Name three primary colors.", "What is 12 times 12?", "Tell me a story.", "How do I boil an egg?",
    "Translate 'good morning' into Spanish.", "What is photosynthesis?", "Write a haiku about the sea."]
ANSWER_TOKENS = 16
AGREEMENT_TOKENS = 24


def _core(checkpoint, dtype: str, cpu_kernels: bool, march: str = "native"):
    from tests.engine.conftest import make_core

    return make_core(checkpoint, dtype=dtype, kv_cache_memory_gb=0.2, max_model_len=2048, cpu_kernels=cpu_kernels,
                     kernel_march=march)


def _greedy(core, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> list[list[int]]:
    from tests.engine.conftest import run_to_end

    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)))
    outs = run_to_end(core)
    return [[t for o in outs[f"r{i}"] for t in o.token_ids] for i in range(len(prompts))]


def _all_logits(core, ids: list[int]) -> torch.Tensor:  # (len(ids), vocab): one prefill, every position
    n = len(ids)
    with torch.inference_mode():
        meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, 0)])
        return core.runner.model(torch.tensor(ids), torch.arange(n), core.runner.kv_caches, meta, torch.arange(n))


def prompts(checkpoint) -> tuple[list[list[int]], list[list[int]]]:
    """(PROMPTS, REFERENCE_QUESTIONS) rendered with the chat template."""
    builder = PromptBuilder(load_tokenizer(checkpoint))
    render = [builder.render(None, [ChatMessage("user", q)]) for q in PROMPTS]
    return render, render[: len(REFERENCE_QUESTIONS)]


def float32_tokens(checkpoint) -> list[list[int]]:
    """eoq's float32 greedy tokens for PROMPTS (equal to transformers' in float32: test_fidelity)."""
    all_prompts, _ = prompts(checkpoint)
    return _greedy(_core(checkpoint, "float32", True), all_prompts, AGREEMENT_TOKENS, ignore_eos=True)


def evaluate(checkpoint, reference: list[list[int]], march: str = "native") -> dict:
    """The measures above for this process's paths; ``reference``: ``float32_tokens``."""
    from transformers import AutoModelForCausalLM

    all_prompts, questions = prompts(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        hf_answers = [hf.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long),
                                  do_sample=False, max_new_tokens=ANSWER_TOKENS)[0, len(q):].tolist()
                      for q in questions]
    result = {"isa": torch.backends.cpu.get_cpu_capability(), "transformers_answers": hf_answers, "paths": {}}
    hf32 = None

    def tie_gap(question: list[int], ours: list[int], theirs: list[int]) -> float | None:
        nonlocal hf32
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if i is None:
            return None if len(ours) == len(theirs) else float("inf")
        if hf32 is None:
            hf32 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits = hf32(torch.tensor([question + ours[:i]])).logits[0, -1]
        return float(logits[theirs[i]] - logits[ours[i]])

    for cpu_kernels in (True, False):
        core = _core(checkpoint, "bfloat16", cpu_kernels, march)
        kernels = core.runner.model.ops.kernels
        agree = total = 0
        for p, ref in zip(all_prompts, reference):
            predicted = _all_logits(core, p + ref)[len(p) - 1 : -1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(predicted, ref))
            total += len(ref)
        answers = _greedy(core, questions, ANSWER_TOKENS, ignore_eos=False)
        result["paths"]["eoq-kernels" if cpu_kernels else "torch-ops"] = {
            "kernels_isa": kernels.isa if kernels is not None else None,
            "agreement": agree / total,
            "answers": answers,
            "tie_gaps": [tie_gap(q, a, t) for q, a, t in zip(questions, answers, hf_answers)],
            "first_logits": _all_logits(core, questions[0])[-1].tolist(),
        }
    return result


if __name__ == "__main__":  # python -m tests.engine.bf16_check MARCH < float32 tokens (JSON) > result (JSON)
    from tests.conftest import model_cache_dir

    ckpt = resolve_checkpoint("default", model_cache_dir()).path
    print(json.dumps(evaluate(ckpt, json.load(sys.stdin), march=sys.argv[1])))
