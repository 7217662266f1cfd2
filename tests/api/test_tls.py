"""TLS and mTLS on the gRPC port, with real certificates made here: a server CA and a server certificate for
127.0.0.1/localhost, a client CA and a client certificate, and a client certificate from the wrong CA.

A TLS server answers TLS clients (Chat, GetModelInfo, health) and refuses plaintext ones and ones that do not
trust its CA; with mTLS only clients holding a certificate from the client CA get through; ``eoq health
--tls --ca-file`` works as a probe (the real CLI, a subprocess); bad TLS settings stop the start naming the
setting; API keys served in clear off loopback are warned about. Every channel here is made by the clients'
own ``open_channel``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq._proto.chat.v1 import chat_pb2 as pb
from eoq._proto.chat.v1 import chat_pb2_grpc
from eoq.api.server import RunningServer, start_server
from eoq.api.tls import transport_name
from eoq.config import load_settings
from eoq.errors import ConfigError
from eoq_clients.common import TransportSecurity, open_channel
from tests.api.client import FRANCE, SERVICE, ask, connect, rpc_error, server_settings, serving
from tests.clients.conftest import run_eoq

pytestmark = pytest.mark.asyncio(loop_scope="package")

KEYS_IN_CLEAR = "keys would cross the network in clear"

# --- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def issue(common_name: str, issuer: Issued | None = None, *, ca: bool = False,
          sans: tuple[x509.GeneralName, ...] = (), usage: x509.ObjectIdentifier | None = None) -> Issued:
    """A P-256 certificate valid now for a day, self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signing_key = issuer.key if issuer else key
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return Issued(builder.sign(signing_key, hashes.SHA256()), key)


def write_pem(issued: Issued, folder: Path, name: str) -> tuple[Path, Path]:
    """(certificate file, unencrypted PKCS#8 key file)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return cert, key


@dataclass(frozen=True)
class Pki:
    ca: Path  # the server CA: what clients trust
    server_cert: Path
    server_key: Path
    client_ca: Path  # what an mTLS server trusts
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from the server CA, not the client CA
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    server_ca = issue("eoq test server CA", ca=True)
    client_ca = issue("eoq test client CA", ca=True)
    server = issue("eoq test server", server_ca, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client = issue("eoq test client", client_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = issue("eoq test stranger", server_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca, _ = write_pem(server_ca, folder, "ca")
    client_ca_file, _ = write_pem(client_ca, folder, "client-ca")
    return Pki(ca, *write_pem(server, folder, "server"), client_ca_file, *write_pem(client, folder, "client"),
               *write_pem(stranger, folder, "stranger"))


# --- servers and channels ----------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def tls_server(pki: Pki) -> AsyncIterator[RunningServer]:
    async with serving(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def mtls_server(pki: Pki) -> AsyncIterator[RunningServer]:
    async with serving(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                       tls_client_ca_file=pki.client_ca) as running:
        yield running


@asynccontextmanager
async def secure_channel(running: RunningServer, security: TransportSecurity) -> AsyncIterator[grpc.aio.Channel]:
    async with open_channel(f"127.0.0.1:{running.port}", security, aio=True) as channel:
        yield channel


async def model_name(channel: grpc.aio.Channel) -> str:
    reply = await chat_pb2_grpc.ChatServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    return reply.name


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status a call gets when the connection is refused; UNAVAILABLE, not a deadline, if TLS says no."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    return (await rpc_error(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))).code()


# --- TLS -----------------------------------------------------------------------------------------------------


async def test_tls_client_is_answered(tls_server: RunningServer, pki: Pki) -> None:
    assert transport_name(tls_server.settings) == "TLS"
    async with secure_channel(tls_server, TransportSecurity(ca_file=pki.ca)) as channel:
        assert await model_name(channel)
        answer = await ask(chat_pb2_grpc.ChatServiceStub(channel), FRANCE, max_tokens=4, timeout=60)
        assert answer.token_ids and answer.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_plaintext_client_is_refused(tls_server: RunningServer) -> None:
    async with connect(tls_server) as stub:
        error = await rpc_error(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("tls", "server_name", "answered"),
    [
        (True, None, False),  # the system roots do not know the test CA
        (False, "localhost", True),  # a name the certificate carries; implies TLS
        (False, "eoq.example", False),  # one it does not
    ],
)
async def test_the_server_certificate_is_verified(tls_server: RunningServer, pki: Pki, tls: bool,
                                                  server_name: str | None, answered: bool) -> None:
    security = TransportSecurity(tls=tls, ca_file=None if tls else pki.ca, server_name=server_name)
    async with secure_channel(tls_server, security) as channel:
        if answered:
            assert await model_name(channel)
        else:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE


# --- mTLS ----------------------------------------------------------------------------------------------------


async def test_mtls_wants_a_certificate_from_the_client_ca(mtls_server: RunningServer, pki: Pki) -> None:
    assert transport_name(mtls_server.settings) == "mTLS"
    without = TransportSecurity(ca_file=pki.ca)
    stranger = TransportSecurity(ca_file=pki.ca, client_cert_file=pki.stranger_cert, client_key_file=pki.stranger_key)
    client = TransportSecurity(ca_file=pki.ca, client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    for security in (without, stranger):
        async with secure_channel(mtls_server, security) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE, security
    async with secure_channel(mtls_server, client) as channel:
        assert await model_name(channel)
        answer = await ask(chat_pb2_grpc.ChatServiceStub(channel), FRANCE, max_tokens=4, timeout=60)
        assert answer.token_ids


# --- eoq health, the real CLI ----------------------------------------------------------------------------------


async def eoq(*args: str) -> subprocess.CompletedProcess[str]:
    # A subprocess run on a thread: the servers answer on this event loop, which must keep running.
    return await asyncio.to_thread(run_eoq, *args)


async def test_eoq_health_over_tls(tls_server: RunningServer, pki: Pki) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    ok = await eoq("health", "--address", address, "--tls", "--ca-file", str(pki.ca))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "SERVING"
    plain = await eoq("health", "--address", address)
    assert plain.returncode == 1
    assert "unhealthy: UNAVAILABLE" in plain.stderr


async def test_eoq_health_over_mtls(mtls_server: RunningServer, pki: Pki) -> None:
    address = f"127.0.0.1:{mtls_server.port}"
    ok = await eoq("health", "--address", address, "--ca-file", str(pki.ca), "--client-cert-file",
                   str(pki.client_cert), "--client-key-file", str(pki.client_key))
    assert ok.returncode == 0, ok.stderr
    no_cert = await eoq("health", "--address", address, "--tls", "--ca-file", str(pki.ca))
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
    half = await eoq("health", "--address", address, "--ca-file", str(pki.ca), "--client-cert-file",
                     str(pki.client_cert))
    assert half.returncode == 2 and "--client-key-file" in half.stderr


# --- eoq chat and eoq bench's server target ----------------------------------------------------------------------


async def test_eoq_chat_over_tls(tls_server: RunningServer, pki: Pki) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    ok = await eoq("chat", "--address", address, "--ca-file", str(pki.ca), "-m", FRANCE, "--max-tokens", "4")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    plain = await eoq("chat", "--address", address, "-m", FRANCE, "--max-tokens", "4")
    assert plain.returncode == 1 and "error: UNAVAILABLE" in plain.stderr


async def test_bench_server_target_over_mtls(mtls_server: RunningServer, pki: Pki) -> None:
    from eoq_clients.bench.targets import ServerTarget

    security = TransportSecurity(ca_file=pki.ca, client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    target = ServerTarget(f"127.0.0.1:{mtls_server.port}", None, security=security)
    try:
        info = await target.start()
    finally:
        await target.close()
    assert info.model == mtls_server.engine.info.name


# --- settings --------------------------------------------------------------------------------------------------


async def test_cert_and_key_go_together(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--tls-cert-file / EOQ_TLS_CERT_FILE and --tls-key-file"):
        load_settings(tls_cert_file=pki.server_cert)
    with pytest.raises(ConfigError, match="--tls-client-ca-file / EOQ_TLS_CLIENT_CA_FILE .*needs --tls-cert-file"):
        load_settings(tls_client_ca_file=pki.client_ca)
    monkeypatch.setenv("EOQ_TLS_KEY_FILE", str(pki.server_key))
    with pytest.raises(ConfigError, match="go together: set both"):
        load_settings()
    settings = load_settings(tls_cert_file=pki.server_cert, tls_client_ca_file=pki.client_ca)
    assert settings.tls_key_file == pki.server_key


@pytest.mark.parametrize("broken", ["tls_cert_file", "tls_key_file", "tls_client_ca_file"])
@pytest.mark.parametrize("how", ["missing", "not PEM"])
async def test_bad_tls_files_stop_the_start_naming_the_setting(pki: Pki, tmp_path: Path, broken: str,
                                                               how: str) -> None:
    files = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": pki.client_ca}
    files[broken] = tmp_path / "absent.pem"
    if how == "not PEM":
        files[broken].write_text("not a certificate\n")
    setting = f"--{broken.replace('_', '-')} / EOQ_{broken.upper()}"
    # The files are checked before the model loads, so this costs milliseconds; were a bad file let through,
    # the server started is stopped again before the failure is reported.
    with pytest.raises(ConfigError, match=setting):
        running = await start_server(server_settings(**files))
        await running.drain_and_stop(0)


async def test_a_key_of_another_certificate_is_named(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="--tls-key-file / EOQ_TLS_KEY_FILE: not an unencrypted PEM private key"):
        running = await start_server(server_settings(tls_cert_file=pki.server_cert, tls_key_file=pki.client_key))
        await running.drain_and_stop(0)


# --- API keys in clear ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "api_keys", "tls", "warned"),
    [
        ("0.0.0.0", "k1:alice", False, True),
        ("10.1.2.3", "k1:alice", False, True),
        ("eoq.example", "k1:alice", False, True),
        ("127.0.0.1", "k1:alice", False, False),
        ("127.8.9.10", "k1:alice", False, False),
        ("::1", "k1:alice", False, False),
        ("localhost", "k1:alice", False, False),
        ("0.0.0.0", "k1:alice", True, False),
        ("0.0.0.0", None, False, False),  # no keys to leak (auth off has its own warning)
    ],
)
async def test_api_keys_without_tls_off_loopback_are_warned_about(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, api_keys: str | None, tls: bool,
    warned: bool,
) -> None:
    tls_files = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key} if tls else {}
    # The warning comes before the model loads; a missing model then stops the start, so none is loaded.
    settings = server_settings(host=host, api_keys=api_keys, model=str(tmp_path / "no-model"), **tls_files)
    with caplog.at_level(logging.WARNING, logger="eoq.api.server"), pytest.raises(ConfigError, match="--model"):
        await start_server(settings)
    assert (KEYS_IN_CLEAR in caplog.text) is warned
