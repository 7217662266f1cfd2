"""The OpenAI-compatible routes (Starlette): authenticate, parse, call the chat layer, shape the answer.

``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions`` (stateless: the client sends the
whole conversation, ``ChatService.complete_messages``), ``POST /v1/completions`` (``ChatService.complete``, the gRPC
``Complete``). Streams are server-sent events. Every route goes through ``HttpApi._serve``: the body limit,
auth (``Authorization: Bearer <key>``, the gRPC API's keys and tenants), the drain, errors in OpenAI's shape
(``eoq.api.http.errors``) and the ``eoq_requests_total`` count (``rpc`` = "METHOD /path", ``code`` = the gRPC
status name of the outcome).

A streamed answer's status is sent with its first event, so refusals before any token (a bad prompt, no place
for the tenant) are real HTTP statuses; an error after it is one last ``data: {"error": ...}`` event, without
``[DONE]``. A client that goes away cancels its generation, streamed or not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from eoq.api.adapter import SamplingPolicy
from eoq.aio import wait_until
from eoq.api.auth import ApiKeys
from eoq.api.http import schemas, sse
from eoq.api.http.errors import (
    BodyTooLarge,
    ClientGone,
    ModelNotFound,
    error_body,
    error_response,
    json_response,
    metric_code,
    plain_error,
)
from eoq.api.http.page import page_routes
from eoq.api.http.stateful import StatefulRoutes
from eoq.chat.events import AnswerEvent
from eoq.chat.service import ChatService
from eoq.engine.types import FinishReason, ModelInfo
from eoq.errors import Unauthenticated, Unavailable
from eoq.metrics import Metrics

log = logging.getLogger(__name__)

_CONVERTER = re.compile(r"\{(\w+):\w+\}")  # a path parameter's converter, left out of the route's label
SHUTTING_DOWN = "the server is shutting down; retry (another replica will answer)"
CUT_SHORT = "the answer was cut short: the server is shutting down; retry (another replica will answer)"


def tenant_of(auth: ApiKeys, request: Request, *, write: bool) -> str:
    """The caller's tenant from ``Authorization: Bearer <key>``, by the gRPC API's ``ApiKeys``: HTTP headers
    are (name, value) pairs like gRPC metadata."""
    if auth.enabled and "authorization" not in request.headers:
        raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
    return auth.authenticate(request.headers.items(), write=write)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it is over ``limit`` bytes: at once by its Content-Length, else (chunked)
    as soon as that many have arrived, never buffering more."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the request body is {int(length)} bytes, over the limit of {limit} "
                           "(--max-http-body-bytes)")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(f"the request body is over the limit of {limit} bytes (--max-http-body-bytes)")
    except ClientDisconnect:  # gone before its body had arrived
        raise ClientGone() from None
    return bytes(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (once the body is read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """``work``'s result, or ``ClientGone`` (``work`` cancelled: its generation aborted) if the client leaves
    first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # until its generation is closed (its outcome is read below)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class HttpApi:
    """The ASGI app (``app``) over the server's chat service, keys, sampling policy and metrics."""

    def __init__(self, chat: ChatService, auth: ApiKeys, policy: SamplingPolicy, info: ModelInfo,
                 metrics: Metrics, max_body_bytes: int) -> None:
        self.chat = chat
        self.auth = auth
        self.policy = policy
        self.model = info.name
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.draining = False
        self._active: set[object] = set()  # requests generating an answer now (streamed or not)
        routes = [
            self._route("GET", "/v1/models", self.list_models, write=False),
            self._route("GET", "/v1/models/{model:path}", self.get_model, write=False),
            self._route("POST", "/v1/chat/completions", self.chat_completions, write=True),
            self._route("POST", "/v1/completions", self.completions, write=True),
            *StatefulRoutes(self).routes(),
        ]
        self.routes = [r.name for r in routes]  # the rpc labels
        routes += page_routes()  # the browser chat page (/ and /static/...): no API route, no rpc label
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_exception})

    # --- drain support ---
    @property
    def num_active(self) -> int:
        return len(self._active)

    async def wait_active(self, timeout: float) -> bool:
        """Wait until no answer is being generated (True) or ``timeout`` passes (False)."""
        return await wait_until(lambda: not self._active, timeout)

    # --- plumbing ---
    def _route(self, method: str, path: str, handler: Callable, *, write: bool) -> Route:
        label = method + " " + _CONVERTER.sub(r"{\1}", path)  # "GET /v1/models/{model}"

        async def endpoint(request: Request) -> Response:
            request_id = secrets.token_hex(12)
            try:
                tenant = tenant_of(self.auth, request, write=write)
                if self.draining:
                    raise Unavailable(SHUTTING_DOWN)
                response = await handler(request, tenant, request_id, label)
            except ClientGone:  # nobody to answer
                self.metrics.on_rpc(label, "CANCELLED")
                return Response(status_code=499)
            except asyncio.CancelledError:  # the server stopping past its grace
                self.metrics.on_rpc(label, "CANCELLED")
                raise
            except Exception as e:  # noqa: BLE001 - every error is an answer; a bug's a logged 500
                self.metrics.on_rpc(label, metric_code(e))
                return error_response(e, label, request_id)
            response.headers["x-request-id"] = request_id
            if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
                self.metrics.on_rpc(label, "OK")
            return response

        return Route(path, endpoint, methods=[method], name=label)

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own refusals (no such route, wrong method) in OpenAI's shape; not counted (an unknown
        path is no label)."""
        request_id = secrets.token_hex(12)
        if exc.status_code == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}.", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        response = plain_error(exc.status_code, message, code, request_id)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def _parse(self, request: Request, model_type: type):
        body = await read_body(request, self.max_body_bytes)
        req = schemas.parse(model_type, body)
        if req.model != self.model:
            raise ModelNotFound(f"The model `{req.model}` does not exist: this server serves `{self.model}`")
        req.check()
        return req

    # --- routes ---
    def _model_object(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "eoq"}

    async def list_models(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        return json_response({"object": "list", "data": [self._model_object()]})

    async def get_model(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        if request.path_params["model"] != self.model:
            raise ModelNotFound(f"The model `{request.path_params['model']}` does not exist: this server serves "
                                f"`{self.model}`")
        return json_response(self._model_object())

    async def _without_end_logprobs(self, events: AsyncIterator[AnswerEvent], sampling) -> AsyncIterator[
            AnswerEvent]:
        """``events`` without the logprob of the token that ended each answer (OpenAI lists only the answer's
        tokens)."""
        ends = self.chat.end_token_ids | set(sampling.stop_token_ids)
        async with aclosing(events) as it:
            async for e in it:
                if e.finish_reason is not None and e.logprobs:
                    e.logprobs = [lp for lp in e.logprobs if lp.token_id not in ends]
                yield e

    async def chat_completions(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        req = await self._parse(request, schemas.ChatCompletionRequest)
        messages = req.chat_messages()
        sampling = req.sampling(self.policy)
        token_text = await self.chat.token_text(sampling)
        events = self._without_end_logprobs(self.chat.complete_messages(tenant, messages, sampling), sampling)
        id_, created = f"chatcmpl-{request_id}", int(time.time())
        if not req.stream:
            choices = await self._collect_all(request, events)
            return json_response(schemas.chat_completion(id_, created, self.model, choices, token_text))

        def chunk(delta, finish=None, usage=None, index=0, logprobs=None):
            return sse.event(schemas.chat_chunk(id_, created, self.model, delta, finish, usage, req.include_usage,
                                                index, logprobs))

        def render(e: AnswerEvent) -> list[bytes]:
            lp = schemas.chat_logprobs(e.logprobs, token_text) if e.logprobs else None
            out = [chunk({"content": e.text}, index=e.index, logprobs=lp)] if e.text or lp else []
            if e.finish_reason is not None:
                out.append(chunk({}, schemas.finish_reason(e), index=e.index))
                if req.include_usage and e.usage is not None:
                    out.append(chunk(None, usage=e.usage))
            return out

        head = [chunk({"role": "assistant", "content": ""}, index=i) for i in range(sampling.n)]
        return await self._stream(request, label, request_id, events, head, render)

    async def completions(self, request: Request, tenant: str, request_id: str, label: str) -> Response:
        req = await self._parse(request, schemas.CompletionRequest)
        prompt = req.prompt_text()
        sampling = req.sampling(self.policy)
        token_text = await self.chat.token_text(sampling)
        events = self._without_end_logprobs(self.chat.complete(prompt, sampling, tenant), sampling)
        id_, created = f"cmpl-{request_id}", int(time.time())
        if not req.stream:
            c = await self._collect_all(request, events)
            choices = [schemas.text_choice(i, text, c.finish_reason(i), None if c.logprobs[i] is None
                                           else schemas.completion_logprobs(c.logprobs[i], token_text))
                       for i, text in enumerate(c.texts)]
            return json_response(schemas.text_completion(id_, created, self.model, choices, c.last.usage, True))
        offsets = [0] * sampling.n  # text_offset of each answer's next token

        def chunk(choice, usage=None):
            return sse.event(schemas.text_completion(id_, created, self.model, choice and [choice], usage,
                                                     req.include_usage))

        def render(e: AnswerEvent) -> list[bytes]:
            out = []
            if e.text or e.logprobs:
                lp = schemas.completion_logprobs(e.logprobs, token_text, offsets[e.index]) if e.logprobs else None
                offsets[e.index] += len(e.text)
                out.append(chunk(schemas.text_choice(e.index, e.text, None, lp)))
            if e.finish_reason is not None:
                out.append(chunk(schemas.text_choice(e.index, "", schemas.finish_reason(e))))
                if req.include_usage and e.usage is not None:
                    out.append(chunk(None, usage=e.usage))
            return out

        return await self._stream(request, label, request_id, events, [], render)

    # --- answers ---
    async def _first(self, request: Request, it: AsyncIterator[AnswerEvent]) -> AnswerEvent:
        """The first event of ``it`` (closed if that fails, or if the client leaves meanwhile: ``ClientGone``)."""
        try:
            return await unless_disconnected(request, anext(it))
        except BaseException:
            await it.aclose()
            raise

    async def _collect(self, request: Request, events: AsyncIterator[AnswerEvent],
                       cancelled_ok: bool = False) -> tuple[str, AnswerEvent]:
        """A whole answer (the text, the last event), generation cancelled if the client leaves meanwhile. An
        answer cut short (CANCELLED: only the drain cancels one whose client still waits) is a 503 unless
        ``cancelled_ok``."""

        choices = await self._collect_all(request, events, cancelled_ok)
        return choices.texts[0], choices.last

    async def _collect_all(self, request: Request, events: AsyncIterator[AnswerEvent],
                           cancelled_ok: bool = False) -> schemas.Choices:
        """Every answer of a request for ``n``, by ``_collect``'s rules."""

        async def collect() -> schemas.Choices:
            async with aclosing(events) as it:
                gathered = [e async for e in it]
            if not gathered or (not cancelled_ok and any(e.finish_reason is FinishReason.CANCELLED
                                                         for e in gathered)):
                raise Unavailable(CUT_SHORT)
            return schemas.Choices(gathered)

        return await self._while_active(request, collect())

    async def _while_active(self, request: Request, work):
        """``work``, counted as an active answer (the drain waits for it), cancelled if the client leaves."""
        token = object()
        self._active.add(token)
        try:
            return await unless_disconnected(request, work)
        finally:
            self._active.discard(token)

    async def _stream(self, request: Request, label: str, request_id: str, events: AsyncIterator[AnswerEvent],
                      head: list[bytes], render: Callable[[AnswerEvent], list[bytes]], done: bool = True,
                      cancelled_ok: bool = False) -> Response:
        """Server-sent events of ``events``: the first is awaited before the status is sent (refusals before
        any token are statuses); then ``head``, each event rendered, and ``[DONE]`` if ``done``. An answer cut
        short (CANCELLED) ends with an error event unless ``cancelled_ok`` (``render`` says it then)."""
        token = object()
        self._active.add(token)
        it = aiter(events)
        try:
            first = await self._first(request, it)
        except BaseException:
            self._active.discard(token)
            raise
        outcome = ["CANCELLED"]  # unless the body ends otherwise: the client left (Starlette cancels the body)

        async def body() -> AsyncIterator[bytes]:
            try:
                for part in head:
                    yield part
                e = first
                while True:
                    if e.finish_reason is FinishReason.CANCELLED and not cancelled_ok:
                        raise Unavailable(CUT_SHORT)
                    for part in render(e):
                        yield part
                    if e.ends_stream:
                        break
                    e = await anext(it)
                if done:
                    yield sse.DONE
                outcome[0] = "OK"
            except Exception as err:  # noqa: BLE001 - after the status went out: a last event says what happened
                outcome[0] = metric_code(err)
                yield sse.event(error_body(err, label, request_id)[1])

        async def close() -> None:
            try:
                await it.aclose()  # ends the generation if the body did not get to its end
            finally:
                self._active.discard(token)
                self.metrics.on_rpc(label, outcome[0])

        return EventStream(body(), close)


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that always runs ``close`` once it is over — also when its body never
    started or was cancelled between two events (Starlette cancels the body when the client disconnects, and
    neither path closes it)."""

    def __init__(self, content: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self._close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                await self._close()
