"""The drain on the HTTP port: once draining, new requests (either port) are refused 503 with Retry-After; an
answer that ends within the grace period is streamed to its end; those still going when it is over are cut —
a stream with a last error event (no ``[DONE]``), a whole answer with a 503 — and then the port is closed."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.http.app import CUT_SHORT, SHUTTING_DOWN
from tests.api.client import rpc_error, sampling, wait_for
from tests.api.http.conftest import httpx, model_name, raw_client, serving_http

pytestmark = pytest.mark.asyncio(loop_scope="package")

GRACE = 15.0  # the short answer (24 tokens) must end within it even on a loaded 2-core machine


def story(model: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


async def test_drain_refuses_new_requests_finishes_what_fits_in_the_grace_and_cuts_the_rest() -> None:
    async with serving_http() as running, raw_client(running) as raw:
        model = model_name(running)
        short_cm = raw.stream("POST", "/v1/chat/completions", json=story(model, 24, True))
        long_cm = raw.stream("POST", "/v1/chat/completions", json=story(model, 4000, True))
        short, long = await short_cm.__aenter__(), await long_cm.__aenter__()
        short_lines, long_lines = short.aiter_text(), long.aiter_text()
        short_text, long_text = await anext(short_lines), await anext(long_lines)
        whole = asyncio.create_task(raw.post("/v1/chat/completions", json=story(model, 4000, False)))
        await wait_for(lambda: running.engine.num_unfinished == 3, 30.0, "three answers generating")
        assert running.num_answering == 3

        drain = asyncio.create_task(running.drain_and_stop(GRACE))
        await wait_for(lambda: running.http.api.draining, 5.0, "draining")
        for method, path, body in (("POST", "/v1/chat/completions", story(model, 1, False)),
                                   ("POST", "/v1/completions", {"model": model, "prompt": "Hi"}),
                                   ("GET", "/v1/models", None)):
            refused = await raw.request(method, path, json=body)
            assert (refused.status_code, refused.headers["retry-after"]) == (503, "1"), refused.text
            assert refused.json()["error"] == {"message": SHUTTING_DOWN, "type": "server_error", "param": None,
                                               "code": "service_unavailable"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:  # both ports drain together
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            error = await rpc_error(stub.Complete(pb.CompleteRequest(prompt="Hi", sampling=sampling())).read())
            assert error.code() == grpc.StatusCode.UNAVAILABLE

        # The short answer ends within the grace period: streamed to its end.
        async for part in short_lines:
            short_text += part
        short_events = events(short_text)
        assert short_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        # The long one is cut when the grace period is over: its last event says why, and there is no [DONE].
        async for part in long_lines:
            long_text += part
        long_events = events(long_text)
        assert "[DONE]" not in long_events
        assert json.loads(long_events[-1])["error"] == {"message": CUT_SHORT, "type": "server_error",
                                                        "param": None, "code": "service_unavailable"}
        assert all("choices" in json.loads(e) for e in long_events[:-1])
        cut = await whole
        assert (cut.status_code, cut.json()["error"]["message"]) == (503, CUT_SHORT)
        await short_cm.__aexit__(None, None, None)
        await long_cm.__aexit__(None, None, None)

        await asyncio.wait_for(drain, 30)
        assert running.num_answering == 0
        with pytest.raises(httpx.ConnectError):  # the port is closed
            await raw.get("/v1/models")
        count = running.metrics.registry.get_sample_value
        assert count("eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "UNAVAILABLE"}) == 3
        assert count("eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "OK"}) == 1
