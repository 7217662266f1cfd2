"""How eoq reaches Redis: one asyncio client, to a fixed address or to the primary that Redis Sentinel names.

``connect`` builds the client that ``RedisConversationStore`` and its answer log share (one pool, one retry
policy, one failure mapping). With sentinels the client is redis-py's ``Sentinel(...).master_for(NAME)``: each
new connection asks the sentinels which server is the primary, so after a failover the next call reaches the
promoted replica without a restart. While the sentinels see the old primary down and have not promoted yet,
the client finds no primary (``MasterNotFoundError``, a ``ConnectionError``) and the store answers
``StoreUnavailable``; a connection still open to a demoted primary gets ``READONLY``, which redis-py turns into a
``ConnectionError`` after dropping that connection, so the one immediate retry goes to the new primary.

``waited`` makes a write script wait for replicas (Redis ``WAIT``) on the same connection, in one pipeline:
``WAIT`` counts the acknowledgements of the writes made on the connection it runs on, so it must follow the
script there, not run on another pooled connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

logger = logging.getLogger(__name__)

DEFAULT_SENTINEL_PORT = 26379


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """``"host:port,host:port"`` (``[v6]:port``; a missing port is 26379) as (host, port) pairs, in order.
    Raises ``ValueError`` naming the bad entry."""
    found = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):  # [::1]:26379
            host, sep, rest = entry[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"not host:port: {entry!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
        if not host:
            raise ValueError(f"not host:port: {entry!r}")
        try:
            port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"not host:port: {entry!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {entry!r}")
        found.append((host, port))
    if not found:
        raise ValueError("no sentinel given: expected host:port,host:port")
    return tuple(found)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}"))


@dataclass
class RedisConnection:
    """The shared client, how to name it (``description`` at start, ``where`` in error logs; neither holds a
    password), and what else must be closed with it (the sentinels' own clients)."""

    client: aioredis.Redis
    description: str
    where: str
    _sentinel: Sentinel | None = field(default=None, repr=False)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def connect(
    url: str | None,
    timeout_seconds: float,
    *,
    sentinels: Sequence[tuple[str, int]] = (),
    sentinel_master: str | None = None,
) -> RedisConnection:
    """The client: ``url`` alone (``redis://``, ``rediss://``, ``unix://``), or the primary named
    ``sentinel_master`` by ``sentinels``, ``url`` (optional) then giving only the database, username, password
    and TLS (``rediss://``) of the connections to it (its host is not used). Connect and read timeouts are
    ``timeout_seconds``, the sentinels' too. One immediate retry, on a broken connection only (never on a
    timeout): a pooled connection that Redis closed when it restarted, or one to a primary that was demoted,
    fails once and the retry reconnects (asking the sentinels again). The store's scripts make a retry safe
    when the first attempt did run."""
    common: dict[str, Any] = dict(
        decode_responses=True,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    if not sentinels:
        if not url:
            raise ValueError("a Redis URL or sentinels are needed")
        client = aioredis.Redis.from_url(url, **common)
        kwargs = client.connection_pool.connection_kwargs
        address = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return RedisConnection(client, f"redis at {redact(url)}", f"redis at {address}")
    if not sentinel_master:
        raise ValueError("sentinels need the name of the primary they monitor (sentinel_master)")
    options: dict[str, Any] = {}
    if url:
        parsed = aioredis.connection.parse_url(url)
        for key in ("db", "username", "password"):
            if parsed.get(key) is not None:
                options[key] = parsed[key]
        if urlsplit(url).scheme == "rediss":
            options["ssl"] = True
    sentinel_options = {k: v for k, v in common.items() if k.startswith("socket_")}
    sentinel = Sentinel(list(sentinels), sentinel_kwargs=sentinel_options)
    client = sentinel.master_for(sentinel_master, redis_class=aioredis.Redis, **common, **options)
    hosts = ",".join(f"{h}:{p}" for h, p in sentinels)
    db = f", db {options['db']}" if options.get("db") else ""
    name = f"redis primary '{sentinel_master}' (from sentinels {hosts}{db})"
    return RedisConnection(client, name, name, sentinel)


def waited(
    script: Any,
    client: aioredis.Redis,
    replicas: int,
    timeout_ms: int,
    on_short: Callable[[int], None] | None = None,
) -> Any:
    """``script`` (a registered script) as a callable of the same signature whose writes are followed by
    ``WAIT replicas timeout_ms`` on their connection; ``script`` itself when ``replicas`` is 0. The script's
    reply is returned either way: its writes are on the primary whatever ``WAIT`` says. When fewer replicas
    acknowledged within ``timeout_ms``, ``on_short(acknowledged)`` is called (the write is then only as safe as
    without waiting)."""
    if replicas <= 0:
        return script

    async def run(keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        async with client.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.wait(replicas, timeout_ms)
            reply, acknowledged = await pipe.execute()
        if acknowledged < replicas and on_short is not None:
            on_short(acknowledged)
        return reply

    return run
