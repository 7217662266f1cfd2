"""The browser chat page at ``/``: plain HTML, CSS and JavaScript shipped inside the package (``static/``, no
build step, nothing fetched from elsewhere), served by the HTTP API's own server.

The page talks to the same OpenAI-compatible routes as any client (``/v1/responses``, ``/v1/conversations``
and eoq's branching extensions), with the API key the user types in (kept in the browser's ``localStorage``,
sent as ``Authorization: Bearer``); the page itself needs no key. It is served with a strict
Content-Security-Policy: scripts, styles and connections from this origin only, no inline script or style,
no frames, no plugins — model and user text is untrusted and the page only ever inserts it as text.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).with_name("static")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


async def index(request: Request) -> Response:
    """The page itself, revalidated on every load (so an upgraded server serves its new page at once)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Cache-Control": "no-cache"})


class _Static(StaticFiles):
    """The page's scripts and styles, with the same security headers as the page."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, with_headers)


def page_routes() -> list:
    """``GET /`` (the page) and ``/static/...`` (its script and style sheet)."""
    return [
        Route("/", index, methods=["GET", "HEAD"], name="page"),
        Mount("/static", app=_Static(directory=STATIC), name="static"),
    ]
