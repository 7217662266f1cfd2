"""What the sample clients share: the channel (plaintext, TLS or mTLS), auth metadata and conversation-id
routing metadata. ``eoq health`` and deploy/healthcheck.py open their channels here too."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.errors import ConfigError

DEFAULT_ADDRESS = "localhost:50051"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})

ChannelOptions = Sequence[tuple[str, int | str]]


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("EOQ_ADDRESS", DEFAULT_ADDRESS),
                        help=f"server host:port [env EOQ_ADDRESS, default {DEFAULT_ADDRESS}]")
    parser.add_argument("--api-key", default=os.environ.get("EOQ_API_KEY"),
                        help="API key, sent as 'authorization: Bearer <key>' [env EOQ_API_KEY]")
    add_tls_flags(parser)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The transport-security flags every client takes, each also an ``EOQ_*`` variable (read when the parser is
    built, i.e. when the command starts). ``TransportSecurity.from_args`` turns them into one value."""
    group = parser.add_argument_group("TLS", "plaintext unless --tls, --ca-file or a client certificate is given")
    group.add_argument("--tls", action=argparse.BooleanOptionalAction,
                       default=os.environ.get("EOQ_TLS", "").strip().lower() in TRUE_WORDS,
                       help="use TLS, verifying the server against the system's CA roots [env EOQ_TLS=1]")
    group.add_argument("--ca-file", type=Path, default=_env_path("EOQ_CA_FILE"), metavar="PATH",
                       help="PEM CA bundle to verify the server with instead (implies --tls) [env EOQ_CA_FILE]")
    group.add_argument("--client-cert-file", type=Path, default=_env_path("EOQ_CLIENT_CERT_FILE"), metavar="PATH",
                       help="PEM client certificate for mTLS (implies --tls; with --client-key-file) "
                            "[env EOQ_CLIENT_CERT_FILE]")
    group.add_argument("--client-key-file", type=Path, default=_env_path("EOQ_CLIENT_KEY_FILE"), metavar="PATH",
                       help="PEM private key of --client-cert-file [env EOQ_CLIENT_KEY_FILE]")
    group.add_argument("--tls-server-name", default=os.environ.get("EOQ_TLS_SERVER_NAME"), metavar="NAME",
                       help="the name the server's certificate must carry, when it is not the --address host "
                            "(e.g. a probe dialing 127.0.0.1 in a pod whose certificate names the Service) "
                            "[env EOQ_TLS_SERVER_NAME]")


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it: {e.strerror or e}") from None


@dataclass(frozen=True, slots=True)
class TransportSecurity:
    """How a client's channel is secured. Plaintext unless ``tls`` is set or implied: a CA bundle (``ca_file``;
    without it the system roots) verifies the server, a client certificate and key (both or neither: raises
    ``ConfigError``) answer a server that asks for one (mTLS), ``server_name`` overrides the name the server's
    certificate is checked against."""

    tls: bool = False
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ConfigError("--client-cert-file and --client-key-file go together (mTLS): give both or neither")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransportSecurity:
        """From the flags of ``add_tls_flags``."""
        return cls(args.tls, args.ca_file, args.client_cert_file, args.client_key_file, args.tls_server_name)

    @property
    def enabled(self) -> bool:
        """TLS is on: asked for, or implied by a CA bundle, a client certificate or a server name."""
        return self.tls or any(v is not None for v in (self.ca_file, self.client_cert_file, self.server_name))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials (``None`` = plaintext), the files read now; ``ConfigError`` if one cannot be."""
        if not self.enabled:
            return None
        ca = _read(self.ca_file, "--ca-file") if self.ca_file else None
        cert = _read(self.client_cert_file, "--client-cert-file") if self.client_cert_file else None
        key = _read(self.client_key_file, "--client-key-file") if self.client_key_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


PLAINTEXT = TransportSecurity()


def open_channel(address: str, security: TransportSecurity = PLAINTEXT, options: ChannelOptions = (), *,
                 aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """The one place a client channel is made: plaintext, TLS or mTLS as ``security`` says; a ``grpc.aio``
    channel when ``aio``. Raises ``ConfigError`` when a certificate file cannot be read."""
    credentials = security.credentials()
    opts = list(options)
    if credentials is not None and security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    grpc_module = grpc.aio if aio else grpc
    if credentials is None:
        return grpc_module.insecure_channel(address, options=opts)
    return grpc_module.secure_channel(address, credentials, options=opts)


def metadata(api_key: str | None, conversation_id: str = "") -> list[tuple[str, str]]:
    """Call metadata: the API key, and the conversation id for load balancers that hash on it."""
    md = []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    if conversation_id:
        md.append(("x-conversation-id", conversation_id))
    return md


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


def aio_stub(address: str, security: TransportSecurity = PLAINTEXT
             ) -> tuple[grpc.aio.Channel, chat_pb2_grpc.ChatServiceStub]:
    channel = open_channel(address, security, channel_options(), aio=True)
    return channel, chat_pb2_grpc.ChatServiceStub(channel)


def sync_stub(address: str, security: TransportSecurity = PLAINTEXT
              ) -> tuple[grpc.Channel, chat_pb2_grpc.ChatServiceStub]:
    channel = open_channel(address, security, channel_options())
    return channel, chat_pb2_grpc.ChatServiceStub(channel)
