"""TLS for the gRPC port: the server's credentials from the settings' files, checked at start."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import grpc

from eoq.config import Settings
from eoq.errors import ConfigError


def _setting(name: str) -> str:
    return f"--{name.replace('_', '-')} / EOQ_{name.upper()}"


def _read_setting_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{_setting(name)}: cannot read {path}: {e.strerror or e}") from None


def _check_certificates(pem: bytes, name: str) -> None:
    """Raise ``ConfigError`` naming the setting unless ``pem`` holds at least one PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"{_setting(name)}: no PEM certificate in the file ({e})") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials: ``None`` = plaintext; TLS with ``tls_cert_file`` + ``tls_key_file``; mTLS
    (clients must present a certificate signed by ``tls_client_ca_file``) when the client CA is set too.

    Reads and checks the files now — at start, before the model loads — and raises ``ConfigError`` naming the
    setting whose file is unreadable, holds no PEM certificate, or (the key) does not match the certificate:
    gRPC itself would only fail to bind, after the model had loaded.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:  # both or neither: Settings checks
        return None
    cert = _read_setting_file(settings.tls_cert_file, "tls_cert_file")
    key = _read_setting_file(settings.tls_key_file, "tls_key_file")
    _check_certificates(cert, "tls_cert_file")
    try:
        # The password callback is only called for an encrypted key, which gRPC cannot use.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert_file, settings.tls_key_file,
                                                                password=lambda: b"")
    except ssl.SSLError as e:
        raise ConfigError(f"{_setting('tls_key_file')}: not an unencrypted PEM private key of the certificate in "
                          f"{settings.tls_cert_file} ({e})") from None
    ca = None
    if settings.tls_client_ca_file is not None:
        ca = _read_setting_file(settings.tls_client_ca_file, "tls_client_ca_file")
        _check_certificates(ca, "tls_client_ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def transport_name(settings: Settings) -> str:
    """What the gRPC port speaks, for the logs: 'mTLS', 'TLS' or 'plaintext'."""
    if settings.tls_cert_file is None:
        return "plaintext"
    return "mTLS" if settings.tls_client_ca_file is not None else "TLS"


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: assume other machines reach it
        return False
