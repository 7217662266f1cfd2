"""eoq errors -> HTTP answers in OpenAI's error shape, in one place.

Every refusal is ``{"error": {"message", "type", "param", "code"}}`` with the status of the error's kind (the
``HTTP_BY_STATUS`` table, keyed by the gRPC status name each error kind carries, so the two APIs cannot
disagree on what an error is; a kind with an answer of its own sets ``http_kind``). Errors
that say when to retry (an overloaded server or tenant) carry ``Retry-After`` (whole seconds, at least 1) and
``retry-after-ms`` (which OpenAI's clients read first); UNAVAILABLE (draining, the engine restarting, Redis
down) carries ``Retry-After: 1``. Anything that is not an ``EoqError``, and ``InternalError`` (whose message
is for operators), is answered 500 with only the route and a request id; the log line with that id holds the
detail and the traceback.

The metrics count HTTP requests under the same status-code names as gRPC calls (``OK``, ``INVALID_ARGUMENT``,
``RESOURCE_EXHAUSTED``...: ``metric_code``), so the dashboards and the error-ratio alert cover both APIs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from starlette.responses import Response

from eoq.errors import ConfigError, EoqError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True, slots=True)
class HttpKind:
    status: int
    type: str
    code: str | None


class InvalidParam(InvalidArgument):
    """A bad request field: ``param`` names it as OpenAI does (``messages[0].content``), ``code`` says how it is
    bad (``invalid_value``, ``invalid_type``, ``missing_required_parameter``, ``unsupported_parameter``...)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class BodyTooLarge(InvalidArgument):
    """The request body is over ``--max-http-body-bytes`` (413)."""

    http_kind = HttpKind(413, "invalid_request_error", "request_too_large")


class ModelNotFound(NotFound):
    """The request names a model this server does not serve (404 ``model_not_found``, as OpenAI answers)."""

    param = "model"
    http_kind = HttpKind(404, "invalid_request_error", "model_not_found")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready (counted CANCELLED; nothing is sent)."""


INTERNAL = HttpKind(500, "server_error", "internal_error")
HTTP_BY_STATUS: dict[str, HttpKind] = {
    "INVALID_ARGUMENT": HttpKind(400, "invalid_request_error", "invalid_value"),
    "FAILED_PRECONDITION": HttpKind(400, "invalid_request_error", "failed_precondition"),
    "UNAUTHENTICATED": HttpKind(401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": HttpKind(403, "permission_error", "permission_denied"),
    "NOT_FOUND": HttpKind(404, "invalid_request_error", "not_found"),
    "ABORTED": HttpKind(409, "invalid_request_error", "conflict"),
    "RESOURCE_EXHAUSTED": HttpKind(429, "rate_limit_error", "rate_limit_exceeded"),
    "UNAVAILABLE": HttpKind(503, "server_error", "service_unavailable"),
    "INTERNAL": INTERNAL,
}


def kind_of(error: BaseException) -> HttpKind:
    if not isinstance(error, EoqError) or isinstance(error, ConfigError):  # bad settings are the server's fault
        return INTERNAL
    return getattr(error, "http_kind", None) or HTTP_BY_STATUS.get(error.status, INTERNAL)


def metric_code(error: BaseException) -> str:
    """The ``code`` label of ``eoq_requests_total`` for a request that failed with ``error``: the gRPC status
    name the same error has on the gRPC port (a too-large body: INVALID_ARGUMENT, like any bad input)."""
    if isinstance(error, ClientGone):
        return "CANCELLED"
    return error.status if isinstance(error, EoqError) else "INTERNAL"


def error_body(error: BaseException, route: str, request_id: str) -> tuple[HttpKind, dict]:
    """The OpenAI error object for ``error`` (logged when it is a 500)."""
    kind = kind_of(error)
    if kind.status == 500:
        # The client learns nothing of the internals (paths, addresses, exception text), only an id that finds
        # the log line with the detail.
        log.error("internal error in %s (request id %s): %s: %s", route, request_id, type(error).__name__, error,
                  exc_info=error)
        message = f"internal error in {route} (request id {request_id})"
    else:
        message = str(error)
    body = {
        "message": message,
        "type": kind.type,
        "param": getattr(error, "param", None),
        "code": getattr(error, "code", None) or kind.code,
    }
    return kind, {"error": body}


def retry_headers(error: BaseException) -> dict[str, str]:
    seconds = getattr(error, "retry_after_seconds", None)
    if seconds is not None:
        return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
    if isinstance(error, Unavailable):
        return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)}
    return {}


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status, headers,
                    media_type="application/json")


def error_response(error: BaseException, route: str, request_id: str) -> Response:
    kind, body = error_body(error, route, request_id)
    return json_response(body, kind.status, {**retry_headers(error), "x-request-id": request_id})


def plain_error(status: int, message: str, code: str, request_id: str) -> Response:
    """An HTTP-level refusal that no eoq error stands for (an unknown URL, a method the route has not)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return json_response(body, status, {"x-request-id": request_id})
