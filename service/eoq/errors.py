"""Typed errors raised below the API layer, each kind with the name of its one gRPC status code (``status``).

Nothing here imports grpc: the engine, the chat layer and the stores raise these, and the servicer's single
interceptor turns them into statuses whose message says what was wrong (``eoq.api.errors``); the HTTP API maps
the same status names to HTTP answers (``eoq.api.http.errors``).
"""

from __future__ import annotations


class EoqError(Exception):
    """Base class: the message is shown to the client, so it says what was wrong and, if possible, what to do."""
    status = "INTERNAL"  # the gRPC status code's name


class InvalidArgument(EoqError):
    """The request itself is wrong (empty message, prompt beyond the context window, bad sampling values)."""
    status = "INVALID_ARGUMENT"


class NotFound(EoqError):
    """An unknown id, or one that belongs to another tenant."""
    status = "NOT_FOUND"


class ResourceExhausted(EoqError):
    """The server is full right now (the waiting queue is at its bound), or a quota is used up (the tenant's
    conversations); retrying later, or after freeing some, may succeed."""
    status = "RESOURCE_EXHAUSTED"


class Unavailable(EoqError):
    """A dependency (Redis) cannot be reached, or the server is shutting down; retrying later may succeed."""
    status = "UNAVAILABLE"


class Aborted(EoqError):
    """A concurrency conflict, e.g. a second question on a conversation whose answer is still streaming."""
    status = "ABORTED"


class FailedPrecondition(EoqError):
    """The request is well-formed but the state it acts on refuses it (e.g. a full conversation); retrying the
    same request will not help until that state changes."""
    status = "FAILED_PRECONDITION"


class Unauthenticated(EoqError):
    """No API key, or an unknown one."""
    status = "UNAUTHENTICATED"


class PermissionDenied(EoqError):
    """A known key that may not do this."""
    status = "PERMISSION_DENIED"


class ConfigError(EoqError):
    """Bad settings at start; the message names the setting to change."""
    status = "FAILED_PRECONDITION"


class InternalError(EoqError):
    """Something failed inside the server (a bug or a failed model step); maps to INTERNAL."""
    status = "INTERNAL"
