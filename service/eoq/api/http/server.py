"""The HTTP port: uvicorn serving ``HttpApi`` on the server's event loop, next to the gRPC server.

The socket is bound by ``bind_socket`` at the start, before the model loads (a port in use stops the start at
once, naming the setting), and handed to uvicorn, which listens on it; a test may hand a socket of its own (port
0: the kernel picks a free one). uvicorn's signal handling is off: SIGTERM/SIGINT belong to ``eoq serve``, whose
drain stops this server last (``stop``). With ``--tls-cert-file``/``--tls-key-file`` the port speaks HTTPS with
the gRPC port's certificate, and with ``--tls-client-ca-file`` it requires client certificates too (mTLS): API
keys never cross the network in clear on one port and not on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from eoq.api.http.app import HttpApi
from eoq.config import Settings
from eoq.errors import ConfigError

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5  # after the drain: how long uvicorn waits for what is left before cancelling it


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet); ``ConfigError`` when that cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"--host / EOQ_HOST {host!r}: cannot listen there for HTTP ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too, as gRPC's does
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} for HTTP ({e.strerror or e}); change --host or "
                          "--http-port / EOQ_HTTP_PORT (0 = no HTTP port)") from None
    return sock


def open_http_socket(settings: Settings) -> socket.socket | None:
    """The bound HTTP socket of the settings, or ``None`` with ``--http-port 0``."""
    return bind_socket(settings.host, settings.http_port) if settings.http_port else None


def _tcp(sock: socket.socket) -> socket.socket:
    """``sock`` with its protocol said (IPPROTO_TCP): asyncio sets TCP_NODELAY on the connections it accepts only
    then. A socket made as ``socket(AF_INET, SOCK_STREAM)`` says 0, and its keep-alive connections would wait
    40 ms for a delayed ACK before each response's body (Nagle's algorithm)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    return sock


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # eoq serve handles the signals (its drain stops this server)
        yield


def _tls_options(settings: Settings) -> dict:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}
    options = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
    if settings.tls_client_ca_file is not None:
        options.update(ssl_ca_certs=str(settings.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    """uvicorn on ``sock``, serving ``api``: ``start`` returns once it accepts connections, ``stop`` closes it."""

    def __init__(self, api: HttpApi, sock: socket.socket, settings: Settings) -> None:
        self.api = api
        self.sock = sock = _tcp(sock)
        self.port: int = sock.getsockname()[1]
        self.scheme = "https" if settings.tls_cert_file is not None else "http"
        config = uvicorn.Config(api.app, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
                                server_header=False, ws="none", timeout_graceful_shutdown=SHUTDOWN_SECONDS,
                                **_tls_options(settings))
        try:
            config.load()  # here, where a failure raises (uvicorn's own start would exit the process)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--tls-cert-file / --tls-key-file: the HTTP port cannot use them ({e})") from None
        self._server = _Uvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.sock]),
                                                            name="eoq-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ConfigError("the HTTP server stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, close idle connections, wait (at most ``SHUTDOWN_SECONDS``) for the rest, cancel it."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_SECONDS + 5)
        except asyncio.TimeoutError:
            log.warning("the HTTP server did not stop within %d s: cancelling it", SHUTDOWN_SECONDS + 5)
            self._task.cancel()
        except Exception:
            log.exception("the HTTP server failed while stopping")


async def start_http(settings: Settings, sock: socket.socket, api: HttpApi) -> HttpServer:
    server = HttpServer(api, sock, settings)
    await server.start()
    return server
