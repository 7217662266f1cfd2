"""The default model with int8 activations against float32 activations over the same low-bit weights: ``auto`` as a
CPU without fast bfloat16 takes it (a float32 model, int8 in decode steps, prompts float32), as a CPU with AVX-512
BF16 takes it (a bfloat16 model, int8 in the decode steps beyond the row kernels) or ``int8`` (every step).

- ``agreement``: over ``PROMPTS`` (questions of their own, 64 tokens each), the share of float32's greedy tokens that
  int8 activations predict too, teacher forced (each position sees float32's tokens before it, so one early
  difference does not count twice; bf16_check measures bfloat16 the same way), in one prefill: the prompt steps'
  path (float32 under ``auto``);
- ``step_agreement``: the same, each answer token fed as a decode step of its own after the prompt's prefill: the
  one-call path of one-token decode steps (the row kernels, int8 under ``auto``) as a decode runs it;
- ``batch_agreement``: the same with every prompt's answer token fed in one decode step, 12 rows a step: the
  one-call path on the panels (int8 under ``auto``, on a bfloat16 machine too: ``BF16_MACHINE``);
- ``free_running``: the share of float32's tokens that free-running greedy decoding reproduces before its first
  difference (a token after a difference counts as lost: a lower bound on the decode steps' agreement), every
  prompt at once, so that the decode steps run the panels (int8 under ``auto`` too);
- ``answers``: the greedy answers to bf16_check's reference questions, decoded as served (one token a step: the
  row kernels and the one-call path), ``batched_answers`` the same decoded beside every prompt (15 rows a step:
  the panels), and ``follow_up``: the answer to "And of Germany?" after the France question and its answer (the
  service tests' second turn, only answerable with the first).
"""

from __future__ import annotations

from unittest import mock

import torch

from eoq.chat.prompt import ChatMessage, PromptBuilder
from eoq.engine.model.attention import AttentionMetadata, PrefillChunk
from eoq.engine.model.checkpoint import load_tokenizer
from eoq.engine.model.decode_attention import PagedKernel

from .bf16_check import ANSWER_TOKENS, REFERENCE_QUESTIONS, _all_logits, _greedy

PROMPTS = [
    "Explain how a bicycle stays upright.", "What causes the seasons on Earth?", "Give me a recipe for pancakes.",
    "Why is the sky blue?", "Describe the water cycle.", "What is the difference between a virus and a bacterium?",
    "Write a short poem about autumn leaves.", "How does a refrigerator keep food cold?",
    "List some tips for learning a new language.", "What were the main causes of the First World War?",
    "How do airplanes fly?", "Summarize the plot of Cinderella.",
]
AGREEMENT_TOKENS = 64


NO_FAST_BF16 = "auto-without-bf16"  # auto, decided as on a CPU without fast bfloat16 (AVX2, AVX-512 without BF16)
# auto in bfloat16, decided as on a CPU with AVX-512 BF16 and no AMX (Zen 4, Zen 5): int8 on the decode panels
BF16_MACHINE = "auto-bf16-machine"


def _core(checkpoint, activations: str, march: str, kv_cache_dtype: str = "auto"):
    from .conftest import make_core

    kind = dict(dtype="float32", kv_cache_memory_gb=0.2, max_model_len=2048, kernel_march=march,
                kv_cache_dtype=kv_cache_dtype)
    if activations == BF16_MACHINE:
        with mock.patch("eoq.engine.builder.cpu_has_fast_bf16", return_value=True), \
                mock.patch("eoq.engine.builder.cpu_has_amx", return_value=False):
            return make_core(checkpoint, activation_quantization="auto", **{**kind, "dtype": "bfloat16"})
    if activations != NO_FAST_BF16:
        return make_core(checkpoint, activation_quantization=activations, **kind)
    with mock.patch("eoq.engine.builder.cpu_has_fast_bf16", return_value=False):
        return make_core(checkpoint, activation_quantization="auto", **kind)


def _step_by_step(core, prompt: list[int], answer: list[int]) -> list[int]:
    """The greedy prediction after each token of ``answer``, fed one decode step each after the prompt's prefill."""
    model, caches, block = core.runner.model, core.runner.kv_caches, core.runner.block_size
    n = len(prompt)
    with torch.inference_mode():
        meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, 0)])
        first = model(torch.tensor(prompt), torch.arange(n), caches, meta, torch.tensor([n - 1]))
        predicted = [int(first[0].argmax())]
        for j, token in enumerate(answer[:-1]):
            pos = n + j
            blocks = torch.arange(pos // block + 1)
            decode = PagedKernel(model.ops.kernels, blocks, torch.tensor([pos + 1]))
            meta = AttentionMetadata(slot_mapping=torch.tensor([pos]), decode=decode)
            logits = model(torch.tensor([token]), torch.tensor([pos]), caches, meta, torch.tensor([0]))
            predicted.append(int(logits[0].argmax()))
    return predicted


def _batched_steps(core, prompts: list[list[int]], answers: list[list[int]]) -> list[list[int]]:
    """The greedy predictions after each token of each answer, every prompt prefilled into blocks of its own, then each
    answer position fed to all of them in one decode step (as many rows as prompts)."""
    model, caches, block = core.runner.model, core.runner.kv_caches, core.runner.block_size
    width = max(len(p) + len(a) for p, a in zip(prompts, answers)) // block + 1  # blocks a sequence
    tables = torch.arange(len(prompts) * width).view(len(prompts), width)
    predicted = []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            n = len(p)
            meta = AttentionMetadata(slot_mapping=i * width * block + torch.arange(n), prefills=[PrefillChunk(0, n, 0)])
            first = model(torch.tensor(p), torch.arange(n), caches, meta, torch.tensor([n - 1]))
            predicted.append([int(first[0].argmax())])
        for j in range(min(len(a) for a in answers) - 1):
            pos = torch.tensor([len(p) + j for p in prompts])
            decode = PagedKernel(model.ops.kernels, tables.flatten(), pos + 1)
            slots = torch.arange(len(prompts)) * width * block + pos
            meta = AttentionMetadata(slot_mapping=slots, decode=decode)
            logits = model(torch.tensor([a[j] for a in answers]), pos, caches, meta, torch.arange(len(prompts)))
            for row, out in zip(logits.argmax(-1).tolist(), predicted):
                out.append(row)
    return predicted


def evaluate(checkpoint, march: str = "native", activations: str = "int8", kv_cache_dtype: str = "auto") -> dict:
    """The measures above for eoq's kernels built for ``march``, ``activations`` = "int8", "off", NO_FAST_BF16 or
    BF16_MACHINE,
    with the KV cache ``kv_cache_dtype`` (auto: bfloat16 where int8 activations run); the reference is float32
    throughout (activations and cache)."""
    builder = PromptBuilder(load_tokenizer(checkpoint))
    prompts = [builder.render(None, [ChatMessage("user", q)]) for q in PROMPTS]
    questions = [builder.render(None, [ChatMessage("user", q)]) for q in REFERENCE_QUESTIONS]
    reference = _greedy(_core(checkpoint, "off", march), prompts, AGREEMENT_TOKENS, ignore_eos=True)
    core = _core(checkpoint, activations, march, kv_cache_dtype)
    agree = total = 0
    for p, ref in zip(prompts, reference):
        predicted = _all_logits(core, p + ref)[len(p) - 1 : -1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(predicted, ref))
        total += len(ref)
    step_agree = sum(a == b for p, ref in zip(prompts, reference) for a, b in zip(_step_by_step(core, p, ref), ref))
    batch_agree = sum(a == b for out, ref in zip(_batched_steps(core, prompts, reference), reference)
                      for a, b in zip(out, ref))
    free = _greedy(core, prompts, AGREEMENT_TOKENS, ignore_eos=True)  # decode steps of 12 rows: the panels
    answers = _greedy(core, questions, ANSWER_TOKENS, ignore_eos=False)
    batched = _greedy(core, questions + prompts, ANSWER_TOKENS, ignore_eos=False)[: len(questions)]
    tokenizer = load_tokenizer(checkpoint)
    first = tokenizer.decode(answers[0], skip_special_tokens=True)
    second = builder.render(None, [ChatMessage("user", REFERENCE_QUESTIONS[0]), ChatMessage("assistant", first),
                                   ChatMessage("user", "And of Germany?")])
    same_prefix = [next((i for i, (a, b) in enumerate(zip(f, r)) if a != b), len(r)) for f, r in zip(free, reference)]
    return {
        # The matmuls that take int8 activations in a decode step of 1 and of 12 rows, and in a prompt's step.
        "int8_decode_steps": [sum(lin.runs_int8_activations(rows, decode=True) for lin in core.runner.model.linears())
                              for rows in (1, len(prompts))],
        "int8_prompt_steps": sum(lin.runs_int8_activations(64) for lin in core.runner.model.linears()),
        "one_call_tokens": core.runner.model.one_call_tokens,
        "kv_cache_dtype": str(core.runner.kv_dtype).removeprefix("torch."),
        "row_tokens": core.runner.model.row_tokens,
        "agreement": agree / total,
        "step_agreement": step_agree / total,
        "batch_agreement": batch_agree / total,
        "free_running": sum(same_prefix) / total,
        "same_prefix": same_prefix,  # free-running: tokens equal to float32's before the first difference
        "answers": answers,
        "batched_answers": batched,
        "follow_up": _greedy(core, [second], ANSWER_TOKENS, ignore_eos=False)[0],
    }
