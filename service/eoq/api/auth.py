"""API keys: ``authorization: Bearer <key>`` metadata -> the tenant the key belongs to.

Keys come from a file (``key tenant [read-only]`` per line, ``#`` comments) and/or the environment
(``EOQ_API_KEYS="key:tenant,key2:tenant2"``). A read-only key may read conversations but not chat, complete,
create or delete (PERMISSION_DENIED). With no keys configured auth is off and every caller is the tenant
``public`` (the server warns at start).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from eoq.errors import ConfigError, PermissionDenied, Unauthenticated

PUBLIC_TENANT = "public"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    read_only: bool = False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: dict[str, Principal]) -> None:
        # Keyed by digest: lookups never compare the secret itself character by character.
        self._by_digest = {_digest(k): p for k, p in keys.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, file: Path | None, inline: str | None) -> ApiKeys:
        keys: dict[str, Principal] = {}
        if file is not None:
            try:
                lines = file.read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"--api-keys-file {file}: cannot read it: {e}") from None
            for n, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "read-only"):
                    raise ConfigError(f"--api-keys-file {file}:{n}: expected 'key tenant [read-only]'")
                keys[parts[0]] = Principal(parts[1], read_only=len(parts) == 3)
        if inline:
            for n, item in enumerate(inline.split(","), 1):
                item = item.strip()
                if not item:
                    continue
                key, sep, tenant = item.partition(":")
                if not sep or not key or not tenant:
                    raise ConfigError(f"--api-keys / EOQ_API_KEYS entry {n}: expected 'key:tenant'")
                keys[key] = Principal(tenant)
        return cls(keys)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None, *, write: bool) -> str:
        """The caller's tenant. Raises ``Unauthenticated`` (no/unknown key) or ``PermissionDenied`` (read-only
        key asking to write)."""
        if not self._by_digest:
            return PUBLIC_TENANT
        value = None
        for k, v in metadata or ():
            if k.lower() == "authorization":
                value = v.decode() if isinstance(v, bytes) else v
                break
        if value is None:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        digest = _digest(key.strip())
        principal = None
        for d, p in self._by_digest.items():
            if hmac.compare_digest(d, digest):
                principal = p
        if principal is None:
            raise Unauthenticated("unknown API key")
        if write and principal.read_only:
            raise PermissionDenied("this API key is read-only: it may list and read conversations only")
        return principal.tenant
