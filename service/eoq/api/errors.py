"""Exceptions -> gRPC status codes, in one interceptor that also counts requests by method and code.

Handlers raise the typed errors of ``eoq.errors``; the interceptor aborts the call with the mapped code and the
error's message. Anything else is a bug, and ``InternalError``'s message is for operators: both are answered
INTERNAL with only the method and a request id ("internal error in Chat (request id 0123456789ab)"), and the log
line with the same id holds the detail and the traceback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from eoq.errors import EoqError

log = logging.getLogger(__name__)


def status_for(error: EoqError) -> grpc.StatusCode:
    """The gRPC status of an error kind: the one its class names (``eoq.errors``)."""
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps errors to statuses for the methods of ``service`` and reports (method, code) to ``on_rpc``."""

    def __init__(self, service: str, on_rpc: Callable[[str, str], None]) -> None:
        self._prefix = f"/{service}/"
        self._on_rpc = on_rpc

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        rpc = details.method[len(self._prefix) :]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(rpc, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(rpc, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, rpc: str, behavior):
        async def wrapped(request, context: grpc.aio.ServicerContext):
            try:
                response = await behavior(request, context)
            except BaseException as e:
                await self._fail(rpc, context, e)
                raise
            self._on_rpc(rpc, "OK")
            return response

        return wrapped

    def _wrap_stream(self, rpc: str, behavior):
        async def wrapped(request, context: grpc.aio.ServicerContext):
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                await self._fail(rpc, context, e)
                raise
            self._on_rpc(rpc, "OK")

        return wrapped

    async def _fail(self, rpc: str, context: grpc.aio.ServicerContext, e: BaseException) -> None:
        """Count the failure; for our errors and bugs, abort with a status (which raises, ending the call)."""
        if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
            self._on_rpc(rpc, code.name)
            return
        if isinstance(e, grpc.aio.AbortError) or not isinstance(e, Exception):
            self._on_rpc(rpc, (context.code() or grpc.StatusCode.UNKNOWN).name)
            return
        code = status_for(e) if isinstance(e, EoqError) else grpc.StatusCode.INTERNAL
        if code is grpc.StatusCode.INTERNAL:
            # The client learns nothing of the internals (paths, addresses, exception text), only an id that
            # finds the log line with the detail.
            request_id = secrets.token_hex(6)
            log.error("internal error in %s (request id %s): %s: %s", rpc, request_id, type(e).__name__, e,
                      exc_info=e)
            message = f"internal error in {rpc} (request id {request_id})"
        else:
            message = str(e)
        self._on_rpc(rpc, code.name)
        await context.abort(code, message, trailing_metadata=_details(code, message, e))


def _details(code: grpc.StatusCode, message: str, e: BaseException) -> tuple[tuple[str, bytes], ...]:
    """``google.rpc.Status`` details for the trailers: a ``RetryInfo`` when the error says when to retry (an
    overloaded server or tenant), so clients back off by the server's estimate instead of guessing."""
    retry_after = getattr(e, "retry_after_seconds", None)
    if retry_after is None:
        return ()
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(retry_after * 1e9))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


# The client's deadline timer usually fires before the server's (the server's clock started when the call
# arrived), so the call is cancelled a few milliseconds before the server sees its deadline pass.
_DEADLINE_SLACK_SECONDS = 0.25


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS
