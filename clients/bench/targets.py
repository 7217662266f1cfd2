"""What the benchmark runs against: an eoq server over gRPC, or eoq's engine in this process.

A target answers N questions at once (``generate``: N concurrent requests, a forced number of tokens each) and
holds conversations (``new_conversation`` + ``turn``). It reports what it saw as ``RequestRecord``s; the
figures are computed in ``workloads.py``, the same for every target. The peers (transformers, llama.cpp) are in
``peers.py``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eoq_clients.bench.workloads import RequestRecord

if TYPE_CHECKING:  # for the annotation only: gRPC is imported where used (peers.py's processes load this module)
    from eoq_clients.common import TransportSecurity

log = logging.getLogger(__name__)

OnTokens = Callable[[int], None]  # told how many tokens just arrived (drives the progress bar)


@dataclass(slots=True)
class TargetInfo:
    """What a target says about itself; every field is optional because not every target can tell."""

    name: str
    description: str
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    kv_cache_tokens: int | None = None
    kv_bytes_per_token: int | None = None
    notes: list[str] = field(default_factory=list)
    kv_cache_dtype: str | None = None

    @property
    def kv_cache_bytes(self) -> int | None:
        if self.kv_cache_tokens is None or self.kv_bytes_per_token is None:
            return None
        return self.kv_cache_tokens * self.kv_bytes_per_token


class Target(abc.ABC):
    """One system under test. ``start`` before anything else, ``close`` at the end."""

    name: str
    # Why `turns` is skipped on this target (None: it runs).
    turns_skipped: str | None = None

    @abc.abstractmethod
    async def start(self) -> TargetInfo: ...

    @abc.abstractmethod
    async def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        """Send all ``questions`` at once, each for exactly ``max_tokens`` tokens (end-of-answer ignored)."""

    async def new_conversation(self) -> object:
        raise NotImplementedError(self.turns_skipped or f"{self.name} holds no conversations")

    async def turn(self, conversation: object, question: str, max_tokens: int, on_tokens: OnTokens) -> RequestRecord:
        """One question in ``conversation``, answered up to ``max_tokens`` tokens (stops at end-of-answer)."""
        raise NotImplementedError(self.turns_skipped or f"{self.name} holds no conversations")

    def memory(self) -> dict:
        """Resident memory of the process that holds the model, in bytes, where it can be measured."""
        return {}

    async def close(self) -> None:
        return None


def _children(pid: int | str) -> list[str]:
    try:
        return [c for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return []


def read_proc_memory(pid: int | str) -> dict:
    """VmRSS (now) and VmHWM (peak) of a Linux process and its child processes (eoq's engine runs in one),
    summed, in bytes; {} where /proc cannot tell."""
    out: dict = {}
    for p in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                name = "rss_bytes" if key == "VmRSS" else "peak_rss_bytes"
                out[name] = out.get(name, 0) + int(value.split()[0]) * 1024  # kB
    return out


def this_process_memory() -> dict:
    """This process's RSS now (from /proc, where there is one) and at its peak (getrusage)."""
    mem = read_proc_memory("self")
    mem["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return mem


def kv_bytes_per_token(config, dtype: str) -> int | None:
    """K and V bytes of one token across all layers, from a transformers config and a dtype name."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if None in (itemsize, layers, kv_heads, head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * itemsize


class LocalModel:
    """The benchmark's model on this machine: checkpoint folder, tokenizer and chat prompts (loaded once)."""

    def __init__(self, model: str, cache_dir: Path) -> None:
        from eoq.chat.prompt import PromptBuilder
        from eoq.engine.model.checkpoint import load_config, load_tokenizer, resolve_checkpoint

        self.checkpoint = resolve_checkpoint(model, cache_dir)
        self.config = load_config(self.checkpoint.path)
        self.tokenizer = load_tokenizer(self.checkpoint.path)
        self.prompts = PromptBuilder(self.tokenizer)

    def question_ids(self, question: str) -> list[int]:
        """The prompt the server would build for a new conversation's first question."""
        from eoq.chat.prompt import ChatMessage

        return self.prompts.render(None, [ChatMessage("user", question)])


# --- an eoq server over gRPC --------------------------------------------------------------------------------


@dataclass(slots=True)
class _ServerConversation:
    id: str = ""  # empty until the first Chat call creates it


@dataclass(eq=False)
class ServerTarget(Target):
    """An eoq server: ``Chat`` calls (each conc-N request starts its own conversation), history kept server-side."""

    name = "server"

    address: str
    api_key: str | None
    server_pid: int | None = None
    timeout_seconds: float = 600.0
    security: TransportSecurity | None = None
    _channel: object = field(default=None, init=False)
    _stub: object = field(default=None, init=False)
    _created: set[str] = field(default_factory=set, init=False)  # conversation ids, deleted at close

    async def start(self) -> TargetInfo:
        import grpc

        from eoq._proto.chat.v1 import chat_pb2 as pb
        from eoq_clients.common import PLAINTEXT, aio_stub, metadata

        self._pb = pb
        self._channel, self._stub = aio_stub(self.address, self.security or PLAINTEXT)
        try:
            mi = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata(self.api_key), timeout=30)
        except grpc.RpcError as e:
            await self._channel.close()
            raise ConnectionError(f"the server at {self.address} did not answer GetModelInfo: "
                                  f"{e.code().name}: {e.details()}") from None
        info = TargetInfo(self.name, f"eoq server at {self.address} (gRPC Chat)", mi.name, mi.dtype, mi.device,
                          mi.kv_cache_tokens)
        info.kv_bytes_per_token = mi.kv_bytes_per_token or None
        info.kv_cache_dtype = mi.kv_cache_dtype or None
        if self.server_pid is None:
            info.notes.append("server RSS not measured (pass --server-pid)")
        return info

    def _sampling(self, max_tokens: int, ignore_eos: bool):
        return self._pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)

    async def _chat(self, conversation_id: str, message: str, max_tokens: int, ignore_eos: bool,
                    on_tokens: OnTokens, sent: float | None = None) -> tuple[RequestRecord, str]:
        from eoq_clients.common import metadata

        request = self._pb.ChatRequest(conversation_id=conversation_id, message=message,
                                       sampling=self._sampling(max_tokens, ignore_eos))
        record = RequestRecord(sent=sent if sent is not None else time.perf_counter())
        call = self._stub.Chat(request, metadata=metadata(self.api_key, conversation_id),
                               timeout=self.timeout_seconds)
        async for event in call:
            now = time.perf_counter()
            conversation_id = event.conversation_id
            n = len(event.token_ids)
            record.add(now, n)
            if n:
                on_tokens(n)
            if event.HasField("usage"):
                u = event.usage
                record.prompt_tokens = u.prompt_tokens
                record.cached_prompt_tokens = u.cached_prompt_tokens
                record.completion_tokens = u.completion_tokens
                record.server_ttft_seconds = u.time_to_first_token_seconds
        return record, conversation_id

    async def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        sent = time.perf_counter()
        results = await asyncio.gather(*(self._chat("", q, max_tokens, True, on_tokens, sent) for q in questions))
        self._created.update(conversation_id for _, conversation_id in results)
        return [record for record, _ in results]

    async def new_conversation(self) -> object:
        return _ServerConversation()

    async def turn(self, conversation: object, question: str, max_tokens: int, on_tokens: OnTokens) -> RequestRecord:
        assert isinstance(conversation, _ServerConversation)
        record, conversation.id = await self._chat(conversation.id, question, max_tokens, False, on_tokens)
        self._created.add(conversation.id)
        return record

    def memory(self) -> dict:
        return read_proc_memory(self.server_pid) if self.server_pid is not None else {}

    async def close(self) -> None:
        if self._channel is None:
            return
        await self._delete_conversations()
        await self._channel.close()

    async def _delete_conversations(self) -> None:
        """Every Chat call of the run started or continued a conversation: delete them, after measuring."""
        import grpc

        from eoq_clients.common import metadata

        async def delete(conversation_id: str) -> bool:
            try:
                await self._stub.DeleteConversation(self._pb.DeleteConversationRequest(id=conversation_id),
                                                    metadata=metadata(self.api_key), timeout=10)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.NOT_FOUND
            return True

        ids = sorted(self._created)
        failed = 0
        for i in range(0, len(ids), 32):
            failed += sum(not ok for ok in await asyncio.gather(*(delete(c) for c in ids[i:i + 32])))
        if failed:
            log.warning("%d of the run's %d conversations could not be deleted; they expire with the server's "
                        "conversation TTL", failed, len(ids))


# --- eoq's engine in this process ---------------------------------------------------------------------------


@dataclass(slots=True)
class _History:
    messages: list = field(default_factory=list)  # ChatMessage, oldest first


@dataclass(eq=False)
class InProcessTarget(Target):
    """eoq's ``AsyncEngine`` in this process, no gRPC and no store: the engine alone.

    ``turns`` sends the whole history each turn (there is no store), rendered like the server renders it, with
    the previous answers' exact tokens, so the engine's prefix cache sees what it sees behind the server."""

    name = "inprocess"

    local_factory: Callable[[], LocalModel]
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int | None = None
    kv_cache_memory_gb: float | None = None
    engine: object = field(default=None, init=False)

    async def start(self) -> TargetInfo:
        from eoq.engine.async_engine import AsyncEngine
        from eoq.engine.types import EngineConfig

        self.local = await asyncio.to_thread(self.local_factory)
        prompts = self.local.prompts
        cfg = EngineConfig(checkpoint=self.local.checkpoint.path, model_name=self.local.checkpoint.name,
                           device=self.device, dtype=self.dtype, kv_cache_memory_gb=self.kv_cache_memory_gb,
                           num_threads=self.num_threads,
                           extra_eos_token_ids=tuple(sorted(prompts.end_of_turn_token_ids)))
        self.engine = AsyncEngine(cfg, mode="process")  # as the server runs it: the engine is not slowed by our loop
        mi = await self.engine.start()
        self._end_ids = frozenset(mi.eos_token_ids)  # the model's end tokens and the template's end-of-turn
        return TargetInfo(self.name, "eoq AsyncEngine in the bench process (no gRPC, no store)", mi.name, mi.dtype,
                          mi.device, mi.kv_cache_tokens, mi.kv_bytes_per_token,
                          ["turns resends the whole history each turn (no store)",
                           "RSS is the bench process (the engine runs in a child process)"], mi.kv_cache_dtype)

    async def _run(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool, on_tokens: OnTokens,
                   sent: float | None = None):
        from eoq.engine.types import EngineRequest, SamplingParams

        request = EngineRequest(self.engine.new_request_id("bench"), prompt_ids,
                                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos))
        record = RequestRecord(sent=sent if sent is not None else time.perf_counter(),
                               prompt_tokens=len(prompt_ids))
        ids: list[int] = []
        text: list[str] = []
        last = None
        async for out in self.engine.generate(request):
            now = time.perf_counter()
            record.add(now, len(out.token_ids))
            if out.token_ids:
                on_tokens(len(out.token_ids))
            ids.extend(out.token_ids)
            text.append(out.text)
            last = out
        if last is not None:
            record.cached_prompt_tokens = last.num_cached_tokens
            record.completion_tokens = last.num_completion_tokens
            if last.timings is not None:
                record.server_ttft_seconds = last.timings.ttft_seconds
        return record, ids, "".join(text), last

    async def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        prompts = [self.local.question_ids(q) for q in questions]
        sent = time.perf_counter()
        results = await asyncio.gather(*(self._run(p, max_tokens, True, on_tokens, sent) for p in prompts))
        return [r[0] for r in results]

    async def new_conversation(self) -> object:
        return _History()

    async def turn(self, conversation: object, question: str, max_tokens: int, on_tokens: OnTokens) -> RequestRecord:
        from eoq.chat.prompt import ChatMessage
        from eoq.engine.types import FinishReason

        assert isinstance(conversation, _History)
        user = ChatMessage("user", question)
        prompt = self.local.prompts.render(None, [*conversation.messages, user])
        record, ids, text, last = await self._run(prompt, max_tokens, False, on_tokens)
        # As the chat service stores an answer (one rule: PromptBuilder.answer_token_ids).
        reason = last.finish_reason if last is not None else None
        token_ids = self.local.prompts.answer_token_ids(ids, reason is FinishReason.STOP,
                                                        reason is FinishReason.LENGTH, self._end_ids)
        conversation.messages.extend([user, ChatMessage("assistant", text, token_ids)])
        return record

    def memory(self) -> dict:
        return this_process_memory()

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
