"""Refusals in OpenAI's error shape, each with its status and the field it is about in ``param``: bad values,
wrong types, unsupported features, unknown models, too-large bodies; never a 500 for anything a client sends.
And the one mapping from eoq's error kinds to HTTP statuses."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from eoq.api.http.errors import HTTP_BY_STATUS, error_response
from eoq.api.server import RunningServer
from eoq.engine.async_engine import EngineFailed, EngineRestarted, Overloaded
from eoq import errors
from tests.api.client import FRANCE, engine_idle, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="package")


def chat_body(model: str, **fields: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": FRANCE}], "max_tokens": 1, **fields}


async def refusal(raw, body: object, path: str = "/v1/chat/completions", status: int = 400) -> dict:
    response = await raw.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                              headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml", "unsupported_parameter"),
    ({"audio": {"voice": "alloy"}}, "audio", "unsupported_parameter"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
])
async def test_unsupported_features_are_refused_naming_the_field(raw, model, fields, param, code) -> None:
    error = await refusal(raw, chat_body(model, **fields))
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"temperature": -1}, "temperature", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 2.5}, "max_tokens", "invalid_type"),
    ({"max_tokens": 10**9}, "max_tokens", "invalid_value"),  # above the server's limit: SamplingParams.validate
    ({"max_tokens": None, "max_completion_tokens": 10**9}, "max_completion_tokens", "invalid_value"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens", "invalid_value"),
    ({"seed": -1}, "seed", "invalid_value"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop", "invalid_value"),
    ({"stop": [""]}, "stop", "invalid_value"),
    ({"stop": 7}, "stop", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "invalid_type"),
    ({"top_k": -1}, "top_k", "invalid_value"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "invalid_value"),
    # output control (issue 17): each bad value names its field
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 9}, "n", "invalid_value"),  # above --max-n
    ({"logprobs": "yes"}, "logprobs", "invalid_type"),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
    ({"presence_penalty": -3.0}, "presence_penalty", "invalid_value"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 150}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"999999": 1}}, None, "invalid_value"),  # outside the vocabulary: checked by the engine
    ({"min_tokens": 600, "max_tokens": 10}, "min_tokens", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     None, "invalid_value"),  # xgrammar's reason, at the door
    ({"structured_outputs": {"regex": "a(b"}}, None, "invalid_value"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].role", "unsupported_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "unsupported_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "invalid_type"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls",
     "unsupported_parameter"),
])
async def test_bad_values_are_400_naming_the_field(raw, model, fields, param, code) -> None:
    error = await refusal(raw, chat_body(model, **fields))
    assert (error["param"], error["code"]) == (param, code), error


async def test_missing_fields_bad_json_and_bodies_that_are_no_object(raw, model) -> None:
    assert (await refusal(raw, {"messages": []}))["param"] == "model"
    missing = await refusal(raw, {"model": model})
    assert (missing["param"], missing["code"], missing["message"]) == (
        "messages", "missing_required_parameter", "Missing required parameter: 'messages'.")
    assert (await refusal(raw, b"{not json"))["code"] == "invalid_json"
    assert (await refusal(raw, b""))["code"] == "invalid_json"
    assert (await refusal(raw, [1, 2]))["code"] == "invalid_type"
    completion = await refusal(raw, {"model": model}, "/v1/completions")
    assert (completion["param"], completion["code"]) == ("prompt", "missing_required_parameter")
    for prompt, code in ((["a", "b"], "unsupported_value"), ([1, 2, 3], "unsupported_value"), (5, "invalid_type")):
        error = await refusal(raw, {"model": model, "prompt": prompt}, "/v1/completions")
        assert (error["param"], error["code"]) == ("prompt", code)
    for fields, param in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
                          ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"n": 30}, "n")):
        error = await refusal(raw, {"model": model, "prompt": "Hi", **fields}, "/v1/completions")
        assert error["param"] == param


async def test_prompts_beyond_the_context_window_and_empty_ones_are_400(raw, model, http_server) -> None:
    context = http_server.engine.info.context_length
    long = "word " * (context + 100)
    error = await refusal(raw, chat_body(model, messages=[{"role": "user", "content": long}]))
    assert "too long" in error["message"] and "tokens" in error["message"]
    error = await refusal(raw, chat_body(model, messages=[{"role": "user", "content": "  "}]))
    assert error["message"] == "the messages are empty"
    assert "empty" in (await refusal(raw, {"model": model, "prompt": ""}, "/v1/completions"))["message"]
    too_many = await refusal(raw, chat_body(model, messages=[{"role": "user", "content": "x" * 200_001}]))
    assert "--max-message-chars" in too_many["message"]


async def test_an_unknown_model_is_404_model_not_found(client: openai.AsyncOpenAI, raw, model) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": FRANCE}])
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    assert model in e.value.message
    error = await refusal(raw, {"model": "gpt-4o", "prompt": "Hi"}, "/v1/completions", 404)
    assert error["code"] == "model_not_found"


async def test_a_body_over_the_limit_is_413(raw, model, http_server: RunningServer) -> None:
    limit = http_server.settings.max_http_body_bytes
    big = chat_body(model, messages=[{"role": "user", "content": "x" * limit}])
    error = await refusal(raw, big, status=413)
    assert (error["code"], error["param"]) == ("request_too_large", None) and str(limit) in error["message"]

    async def chunked():  # no Content-Length: counted as it arrives
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = await raw.post("/v1/chat/completions", content=chunked())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # Just under it is read (and refused only for what it says).
    near = chat_body(model, messages=[{"role": "user", "content": "x" * (limit - 1000)}])
    assert (await refusal(raw, near))["param"] is None  # "too long" (characters), not too large
    assert engine_idle(http_server)


async def test_a_client_that_leaves_mid_body_is_no_error(http_server: RunningServer, caplog) -> None:
    internal = http_server.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "INTERNAL"})
    cancelled = http_server.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "CANCELLED"})
    _, writer = await asyncio.open_connection("127.0.0.1", http_server.http_port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await wait_for(lambda: http_server.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "CANCELLED"}) == cancelled + 1, 5.0,
        "counted CANCELLED")
    assert http_server.metrics.registry.get_sample_value(
        "eoq_requests_total", {"rpc": "POST /v1/chat/completions", "code": "INTERNAL"}) == internal
    assert "internal error" not in caplog.text


async def test_unknown_urls_and_methods_answer_in_the_error_shape(raw) -> None:
    response = await raw.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    response = await raw.delete("/v1/models")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "tools", "response_format", "logprobs", "top_k", "repetition_penalty",
          "ignore_eos", "frequency_penalty"]
VALUES = [None, True, -1, 0, 1, 3.5, 2**70, "", "x", [], [None], ["x"], {}, {"type": "x"}, [{"role": 1}]]


async def test_no_value_in_any_field_is_a_500(raw, model, http_server: RunningServer) -> None:
    """Every field set to each of a spread of JSON values (one at a time): each answer is a 200 or an OpenAI
    error of 4xx — never a 500, never a broken shape."""
    seen = set()
    for name in FIELDS:
        for value in VALUES:
            body = {**chat_body(model), name: value}
            response = await raw.post("/v1/chat/completions", json=body)
            seen.add(response.status_code)
            assert response.status_code in (200, 400, 404), (name, value, response.status_code, response.text)
            if response.status_code != 200:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert seen == {200, 400, 404}
    assert engine_idle(http_server)


async def test_each_eoq_error_kind_has_one_http_status() -> None:
    e = errors
    expected = {
        e.InvalidArgument("x"): 400, e.FailedPrecondition("x"): 400, e.Unauthenticated("x"): 401,
        e.PermissionDenied("x"): 403, e.NotFound("x"): 404, e.Aborted("x"): 409, e.ResourceExhausted("x"): 429,
        Overloaded("x", 2.5): 429, e.Unavailable("x"): 503, EngineRestarted("x"): 503, e.InternalError("x"): 500,
        EngineFailed("x"): 500, e.ConfigError("x"): 500, RuntimeError("x"): 500,
    }
    for error, status in expected.items():
        assert error_response(error, "POST /v1/completions", "rid").status_code == status, error
    # Every status an error kind names (``eoq.errors``) has its HTTP answer.
    kinds = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.EoqError)]
    assert {cls.status for cls in kinds} == set(HTTP_BY_STATUS)


async def test_retry_hints_and_what_a_500_tells() -> None:
    overloaded = error_response(Overloaded("full", 2.2), "POST /v1/completions", "rid")
    assert (overloaded.headers["retry-after"], overloaded.headers["retry-after-ms"]) == ("3", "2200")
    assert error_response(errors.Unavailable("draining"), "GET /v1/models", "rid").headers["retry-after"] == "1"
    assert "retry-after" not in error_response(errors.InvalidArgument("bad"), "GET /v1/models", "rid").headers
    bug = error_response(RuntimeError("/secret/path at 10.0.0.1"), "POST /v1/completions", "0123abcd")
    error = json.loads(bug.body)["error"]
    assert error == {"message": "internal error in POST /v1/completions (request id 0123abcd)",
                     "type": "server_error", "param": None, "code": "internal_error"}
    assert bug.headers["x-request-id"] == "0123abcd"
