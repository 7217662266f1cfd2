"""An OpenAI-compatible HTTP server as a benchmark target: eoq's own HTTP API, llama.cpp's ``llama-server``, vLLM.

Every request is a streamed ``POST /v1/chat/completions`` (``stream_options.include_usage`` for the token counts
and cached prompt tokens where the server reports them), greedy, ``ignore_eos`` for the forced-length workloads
(eoq, llama.cpp and vLLM all take it). A conversation in ``turns`` is kept on the client and sent whole each
turn, as OpenAI's API is stateless: the server's prefix cache is what makes later turns cheap.

Each streamed chunk with content counts as one token (these servers stream a token a chunk); the usage chunk's
``completion_tokens`` puts any tokens that came without their own chunk on the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from eoq_clients.bench.targets import OnTokens, Target, TargetInfo
from eoq_clients.bench.workloads import RequestRecord


@dataclass(slots=True)
class _Messages:
    messages: list[dict] = field(default_factory=list)


class OpenAITarget(Target):
    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_seconds: float = 600.0, label: str = "openai") -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key
        self.model = model
        self.timeout_seconds = timeout_seconds
        self.name = label
        self._client = None

    async def start(self) -> TargetInfo:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_seconds,
                                         limits=limits)
        try:
            r = await self._client.get("/models")
            r.raise_for_status()
        except httpx.HTTPError as e:
            await self._client.aclose()
            raise ConnectionError(f"{self.base_url}/models did not answer: {e}") from None
        models = [m["id"] for m in r.json().get("data", [])]
        if self.model is None:
            if not models:
                raise ConnectionError(f"{self.base_url}/models lists no model; pass --openai-model")
            self.model = models[0]
        return TargetInfo(self.name, f"OpenAI-compatible HTTP at {self.base_url} (chat completions, streamed)",
                          self.model)

    async def _chat(self, messages: list[dict], max_tokens: int, ignore_eos: bool, on_tokens: OnTokens,
                    sent: float | None = None) -> tuple[RequestRecord, str]:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        record = RequestRecord(sent=sent if sent is not None else time.perf_counter())
        texts: list[str] = []
        counted = 0
        async with self._stream(body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        texts.append(text)
                        record.add(now, 1)
                        counted += 1
                        on_tokens(1)
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_prompt_tokens = details.get("cached_tokens")
        if record.completion_tokens and record.completion_tokens > counted and record.events:
            t, n = record.events[-1]
            record.events[-1] = (t, n + record.completion_tokens - counted)
        return record, "".join(texts)

    @contextlib.asynccontextmanager
    async def _stream(self, body: dict):
        """The streamed POST, sent again once on a fresh connection when the server closed a kept-alive one before
        answering (llama-server's HTTP library closes a connection after a few requests; nothing was processed)."""
        import httpx

        for attempt in (1, 2):
            try:
                async with self._client.stream("POST", "/chat/completions", json=body) as r:
                    yield r
                    return
            except httpx.RemoteProtocolError as e:
                if attempt == 2 or "without sending a response" not in str(e):
                    raise

    async def generate(self, questions: list[str], max_tokens: int, on_tokens: OnTokens) -> list[RequestRecord]:
        sent = time.perf_counter()
        results = await asyncio.gather(*(self._chat([{"role": "user", "content": q}], max_tokens, True, on_tokens,
                                                    sent) for q in questions))
        return [record for record, _ in results]

    async def new_conversation(self) -> object:
        return _Messages()

    async def turn(self, conversation: object, question: str, max_tokens: int, on_tokens: OnTokens) -> RequestRecord:
        assert isinstance(conversation, _Messages)
        conversation.messages.append({"role": "user", "content": question})
        record, answer = await self._chat(conversation.messages, max_tokens, False, on_tokens)
        conversation.messages.append({"role": "assistant", "content": answer})
        return record

    def memory(self) -> dict:
        return {}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class LlamaServerTarget(OpenAITarget):
    """llama.cpp's ``llama-server`` started from ``binary`` on the same GGUF file as eoq's default model, with
    continuous batching and ``parallel`` slots (the highest concurrency of the run), ``threads`` threads and
    ``ctx_per_slot`` tokens of context per slot, on a free port of 127.0.0.1; stopped at close. Measured through
    its OpenAI endpoint like any ``http`` target."""

    def __init__(self, binary: str, gguf: str, threads: int, parallel: int, ctx_per_slot: int = 2048) -> None:
        super().__init__("http://127.0.0.1:0/v1", label="llama-server")
        self.binary, self.gguf = binary, gguf
        self.threads, self.parallel, self.ctx_per_slot = threads, parallel, ctx_per_slot
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> TargetInfo:
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._proc = await asyncio.create_subprocess_exec(
            self.binary, "-m", self.gguf, "-t", str(self.threads), "--parallel", str(self.parallel),
            "--cont-batching", "-c", str(self.parallel * self.ctx_per_slot), "--host", "127.0.0.1", "--port",
            str(port), "--no-webui", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient() as client:
            while True:
                if self._proc.returncode is not None:
                    raise ConnectionError(f"llama-server exited with {self._proc.returncode} while starting")
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ConnectionError("llama-server did not become healthy within 120 s")
                await asyncio.sleep(0.25)
        info = await super().start()
        info.description = (f"llama.cpp llama-server ({self.binary}), -t {self.threads} --parallel {self.parallel} "
                            f"--cont-batching, same GGUF, over its OpenAI endpoint")
        return info

    async def close(self) -> None:
        await super().close()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()
