"""Typed errors raised below the API layer, each kind with the name of its one gRPC status code (``status``).

Nothing here imports grpc: the engine, the chat layer and the stores raise these, and the servicer's single
interceptor turns them into statuses whose message says what was wrong (``eoq.api.errors``); the HTTP API maps
the same status names to HTTP answers (``eoq.api.http.errors``).
"""

from __future__ import annotations


class EoqError(Exception):
    """Base class: the message is shown to the client, so it says what was wrong and, if possible, what to do.
    ``status``: the name of the kind's gRPC status code, given as ``class Kind(EoqError, status="NAME")``."""

    status = "INTERNAL"

    def __init_subclass__(cls, status: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status


class InvalidArgument(EoqError, status="INVALID_ARGUMENT"):
    """The request itself is wrong (empty message, prompt beyond the context window, bad sampling values)."""


class NotFound(EoqError, status="NOT_FOUND"):
    """An unknown id, or one that belongs to another tenant."""


class ResourceExhausted(EoqError, status="RESOURCE_EXHAUSTED"):
    """The server is full right now (the waiting queue is at its bound), or a quota is used up (the tenant's
    conversations); retrying later, or after freeing some, may succeed."""


class Unavailable(EoqError, status="UNAVAILABLE"):
    """A dependency (Redis) cannot be reached, or the server is shutting down; retrying later may succeed."""


class Aborted(EoqError, status="ABORTED"):
    """A concurrency conflict, e.g. a second question on a conversation whose answer is still streaming."""


class FailedPrecondition(EoqError, status="FAILED_PRECONDITION"):
    """The request is well-formed but the state it acts on refuses it (e.g. a full conversation); retrying the
    same request will not help until that state changes."""


class Unauthenticated(EoqError, status="UNAUTHENTICATED"):
    """No API key, or an unknown one."""


class PermissionDenied(EoqError, status="PERMISSION_DENIED"):
    """A known key that may not do this."""


class ConfigError(EoqError, status="FAILED_PRECONDITION"):
    """Bad settings at start; the message names the setting to change."""


class InternalError(EoqError, status="INTERNAL"):
    """Something failed inside the server (a bug or a failed model step); maps to INTERNAL."""
