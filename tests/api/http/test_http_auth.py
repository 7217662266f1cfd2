"""Auth and limits on the HTTP API, with the gRPC API's keys: a server with API keys (one read-only) and one
request per tenant at a time. Missing or unknown keys are 401, a read-only key may list models but not
generate (403), a tenant at its limit is 429 with Retry-After while another tenant is served, the prefix cache
is the tenant's own. And the HTTP connections do not wait on Nagle's algorithm."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from eoq.api.server import RunningServer
from tests.api.client import FRANCE, engine_idle, wait_for
from tests.api.http.conftest import model_name, openai_client, raw_client, serving_http

pytestmark = pytest.mark.asyncio(loop_scope="package")

KEYS = "key-one tenant-one\nkey-two tenant-two\nkey-three tenant-three\nkey-reader tenant-one read-only\n"


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    keys = Path(tmp_path_factory.mktemp("keys")) / "keys.txt"
    keys.write_text(KEYS)
    async with serving_http(api_keys_file=keys, max_requests_per_tenant=1) as running:
        yield running


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_a_missing_or_unknown_key_is_401(keyed: RunningServer) -> None:
    model = model_name(keyed)
    async with openai_client(keyed, "not-a-key") as client:
        with pytest.raises(openai.AuthenticationError) as e:
            await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1)
        assert (e.value.code, e.value.body["message"]) == ("invalid_api_key", "unknown API key")
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with raw_client(keyed) as raw:
        response = await raw.get("/v1/models")
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "missing API key: send the header 'Authorization: Bearer <key>'"
        response = await raw.get("/v1/models", headers={"Authorization": "Basic a2V5LW9uZQ=="})
        assert response.status_code == 401 and "Bearer" in response.json()["error"]["message"]
    assert keyed.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "GET /v1/models", "code": "UNAUTHENTICATED"}) >= 3


async def test_a_read_only_key_lists_models_but_may_not_generate(keyed: RunningServer) -> None:
    model = model_name(keyed)
    async with openai_client(keyed, "key-reader") as client:
        assert [m.id async for m in client.models.list()] == [model]
        with pytest.raises(openai.PermissionDeniedError) as e:
            await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1)
        assert e.value.code == "permission_denied" and "read-only" in e.value.message
        with pytest.raises(openai.PermissionDeniedError):
            await client.completions.create(model=model, prompt="Hi", max_tokens=1)
    async with openai_client(keyed, "key-one") as client:
        reply = await client.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16)
        assert "Paris" in reply.choices[0].message.content


async def test_a_tenant_at_its_limit_is_429_with_retry_after_while_others_are_served(keyed: RunningServer) -> None:
    model = model_name(keyed)
    rejected = keyed.metrics.registry.get_sample_value("eoq_admission_rejections_total", {"reason": "tenant_limit"})
    async with openai_client(keyed, "key-one") as one, openai_client(keyed, "key-two") as two:
        stream = await one.chat.completions.create(model=model, messages=user("Tell me a long story."),
                                                   max_tokens=500, stream=True, extra_body={"ignore_eos": True})
        chunks = stream.__aiter__()
        await anext(chunks)  # tenant-one's one place is taken now
        with pytest.raises(openai.RateLimitError) as e:
            await one.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1)
        assert e.value.status_code == 429 and "too many requests of this tenant" in e.value.message
        headers = e.value.response.headers
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
        with pytest.raises(openai.RateLimitError):  # the completions route shares the place
            await one.completions.create(model=model, prompt="Hi", max_tokens=1)
        # Another tenant is not held up.
        other = await two.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=16)
        assert "Paris" in other.choices[0].message.content
        await stream.close()
        await wait_for(lambda: engine_idle(keyed), 10.0, "the stream's generation ended")
        again = await one.chat.completions.create(model=model, messages=user(FRANCE), max_tokens=1)
        assert again.choices[0].finish_reason == "length"
    assert keyed.metrics.registry.get_sample_value(
        "eoq_admission_rejections_total", {"reason": "tenant_limit"}) == rejected + 2
    assert keyed.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "RESOURCE_EXHAUSTED"}) >= 1


async def test_the_prefix_cache_is_the_tenants_own(keyed: RunningServer) -> None:
    model = model_name(keyed)
    question = user("Describe the water cycle in three short sentences for a child of seven, please.")
    async with openai_client(keyed, "key-one") as one, openai_client(keyed, "key-three") as three:
        await one.chat.completions.create(model=model, messages=question, max_tokens=2)
        again = await one.chat.completions.create(model=model, messages=question, max_tokens=2)
        assert again.usage.prompt_tokens_details.cached_tokens >= 32
        # tenant-three has sent nothing before: the same prompt finds none of tenant-one's blocks.
        other = await three.chat.completions.create(model=model, messages=question, max_tokens=2)
        assert other.usage.prompt_tokens_details.cached_tokens == 0
        assert other.usage.prompt_tokens == again.usage.prompt_tokens


async def test_http_connections_send_without_waiting_for_acks(keyed: RunningServer) -> None:
    """TCP_NODELAY on the accepted connections, also when the listening socket was made without its protocol
    (a keep-alive connection would otherwise wait ~40 ms for a delayed ACK before every response body)."""
    async with raw_client(keyed) as raw:
        assert (await raw.get("/v1/models", headers={"Authorization": "Bearer key-one"})).status_code == 200
        connections = keyed.http._server.server_state.connections
        assert connections
        for c in connections:
            sock = c.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
