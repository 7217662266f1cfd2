"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` at the end."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
MEDIA_TYPE = "text/event-stream"


def event(data: object) -> bytes:
    # One line of JSON: json.dumps escapes newlines inside strings, so the event cannot be split.
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def named(name: str, data: object) -> bytes:
    """An event with its type on an ``event:`` line, as OpenAI streams Responses events."""
    return b"event: " + name.encode() + b"\n" + event(data)
