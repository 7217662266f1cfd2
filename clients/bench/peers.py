"""The peers eoq is compared with, on the same model and the same prompts, each in a process of its own.

- ``transformers``: ``AutoModelForCausalLM.generate`` in float32 on the cached checkpoint folder, the baseline.
  conc-N is one static batch of N left-padded prompts; every row is timed by the batch's steps (a streamer is
  told each step's tokens), so its TTFT is the batched prefill and its ITL the batch's step time.
- ``llamacpp``: llama-cpp-python on the default model's GGUF file (Q4_1), 2 threads. Its Python API runs one
  sequence at a time, so conc-N runs the N requests one after another, all "sent" at the start: the aggregate
  tokens/s is a single stream's, and TTFT includes the wait behind the earlier requests, as in a one-slot queue.

Neither keeps conversations, and neither is asked to: ``turns`` is skipped on both.

Why a process each: llama.cpp's OpenMP threads and torch's (the in-process engine, transformers) are separate
thread pools; in one process on a small machine they get in each other's way (llama.cpp measured 10x slower
after transformers had run in the same process). A child process also gives each peer its own RSS. The child
times its requests itself; the parent only relays progress.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from eoq_clients.bench.targets import LocalModel, OnTokens, Target, TargetInfo, kv_bytes_per_token, read_proc_memory
from eoq_clients.bench.workloads import RequestRecord


# llama.cpp built for this CPU without its AMX kernels (they crashed with SIGSEGV on this project's VMs).
LLAMACPP_NO_AMX_INSTALL = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
    '-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON" '
    "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python"
)


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (its package is missing, or it has no file for this model)."""


class PeerFailed(RuntimeError):
    """The peer's process reported an error, or died."""


class Peer(Protocol):
    """A peer as it runs in its child process: synchronous, one call at a time."""

    def load(self) -> TargetInfo: ...

    def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]: ...


class TransformersPeer:
    def __init__(self, local: LocalModel, num_threads: int | None = None) -> None:
        self.local = local
        self.num_threads = num_threads

    def load(self) -> TargetInfo:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.model = AutoModelForCausalLM.from_pretrained(self.local.checkpoint.path, dtype=torch.float32)
        self.model.eval()
        tok = self.local.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return TargetInfo("transformers", "transformers AutoModelForCausalLM.generate, float32, static batch",
                          self.local.checkpoint.name, "float32", "cpu", None,
                          kv_bytes_per_token(self.local.config, "float32"),
                          ["conc-N is one static batch of N (left padding)",
                           f"own process, {torch.get_num_threads()} torch threads"])

    def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        prompts = [self.local.question_ids(q) for q in questions]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # (B, T), left padded
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
        step_times: list[float] = []
        batch = len(prompts)

        class StepTimer(BaseStreamer):
            """generate() puts the prompt first, then each step's (B,) new tokens."""

            def __init__(self) -> None:
                self.seen_prompt = False

            def put(self, value) -> None:
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                step_times.append(time.perf_counter())
                on_tokens(batch)

            def end(self) -> None:
                pass

        sent = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      pad_token_id=self.pad_id, streamer=StepTimer())
        generated = out.shape[1] - width
        records = []
        for p in prompts:
            record = RequestRecord(sent=sent, prompt_tokens=len(p), completion_tokens=generated)
            for t in step_times:
                record.add(t, 1)
            records.append(record)
        return records


class LlamaCppPeer:
    def __init__(self, local: LocalModel, gguf: Path, num_threads: int = 2, n_ctx: int = 2048) -> None:
        self.local = local
        self.gguf = gguf
        self.num_threads = num_threads
        self.n_ctx = n_ctx

    def load(self) -> TargetInfo:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(self.gguf), n_ctx=self.n_ctx, n_threads=self.num_threads,
                         n_threads_batch=self.num_threads, n_batch=512, verbose=False)
        kv = kv_bytes_per_token(self.local.config, "float16")  # llama.cpp's default KV type
        return TargetInfo("llamacpp", f"llama-cpp-python on {self.gguf.name}, {self.num_threads} threads",
                          self.gguf.stem, "gguf (KV f16)", "cpu", self.n_ctx, kv,
                          [("conc-N runs its N requests one after another (one sequence at a time); "
                            "TTFT includes the wait behind earlier requests"),
                           "prompt tokens from eoq's tokenizer (same vocabulary as the GGUF file)",
                           "own process"])

    def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        sent = time.perf_counter()
        records = []
        for q in questions:
            prompt = self.local.question_ids(q)
            record = RequestRecord(sent=sent, prompt_tokens=len(prompt))
            # generate() never stops by itself: the end-of-answer token does not end it (forced tokens).
            # Greedy: temperature 0 makes llama-cpp-python pick the most likely token.
            stream = self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True)
            for _ in stream:
                record.add(time.perf_counter(), 1)
                on_tokens(1)
                if len(record.events) >= max_tokens:
                    break
            stream.close()
            records.append(record)
        return records


# --- a peer in a child process ------------------------------------------------------------------------------


def _make_peer(kind: str, model: str, cache_dir: Path, options: dict) -> Peer:
    local = LocalModel(model, cache_dir)
    if kind == "transformers":
        return TransformersPeer(local, **options)
    if kind == "llamacpp":
        return LlamaCppPeer(local, **options)
    raise ValueError(f"unknown peer {kind!r}")


def _peer_process_main(conn, kind: str, model: str, cache_dir: Path, options: dict) -> None:
    """The child: load the peer, then answer ("generate", questions, max_tokens) until ("stop",)."""
    try:
        peer = _make_peer(kind, model, cache_dir, options)
        info = peer.load()
    except Exception as e:  # noqa: BLE001 - sent to the parent, which reports it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", info))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        _, questions, max_tokens = message
        try:
            records = peer.generate(questions, max_tokens, lambda n: conn.send(("tokens", n)))
        except Exception as e:  # noqa: BLE001 - sent to the parent, which records it for this workload
            conn.send(("error", f"{type(e).__name__}: {e}"))
            continue
        conn.send(("done", records))


@dataclass(eq=False)
class PeerProcessTarget(Target):
    """A peer (``transformers`` or ``llamacpp``) run in a spawned child process; ``options`` are its peer's
    (``num_threads``, ``gguf``)."""

    turns_skipped = "stateless peer, no conversations"

    kind: str
    model: str
    cache_dir: Path
    options: dict = field(default_factory=dict)
    _proc: object = field(default=None, init=False)
    _conn: object = field(default=None, init=False)

    @property
    def name(self) -> str:
        return self.kind

    async def start(self) -> TargetInfo:
        if self.kind == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
            raise PeerUnavailable("llama-cpp-python is not installed: `pip install llama-cpp-python` "
                                  "(it compiles llama.cpp: several minutes)")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads inherited from this one
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_peer_process_main, name=f"eoq-bench-{self.kind}", daemon=True,
                                 args=(child, self.kind, self.model, self.cache_dir, self.options))
        self._proc.start()
        child.close()
        kind, payload = await self._receive()
        if kind != "ready":
            raise PeerFailed(f"{self.kind} did not start: {payload}")
        return payload

    async def _receive(self) -> tuple:
        try:
            return await asyncio.to_thread(self._conn.recv)
        except (EOFError, OSError):
            raise PeerFailed(self._exit_message()) from None

    def _exit_message(self) -> str:
        code = None
        if self._proc is not None:
            self._proc.join(timeout=5)  # the pipe closes before the process is reaped
            code = self._proc.exitcode
        if code is None or code >= 0:
            return f"the {self.kind} process exited (exit code {code})"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        message = f"the {self.kind} process was killed by {name}"
        if self.kind == "llamacpp" and -code == signal.SIGSEGV:
            message += (" (llama.cpp's AMX kernels crash on some virtual machines: rebuild without them, "
                        f"{LLAMACPP_NO_AMX_INSTALL})")
        return message

    async def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        self._conn.send(("generate", questions, max_tokens))
        while True:
            kind, payload = await self._receive()
            if kind == "tokens":
                on_tokens(payload)
            elif kind == "done":
                return payload
            else:
                raise PeerFailed(payload)

    def memory(self) -> dict:
        return read_proc_memory(self._proc.pid) if self._proc is not None and self._proc.is_alive() else {}

    async def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass  # already gone
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()
