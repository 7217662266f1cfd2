"""The HTTP port speaks the gRPC port's TLS: with ``--tls-cert-file``/``--tls-key-file`` and a client CA it is
HTTPS with mTLS — the real OpenAI client with a client certificate is answered; one without a certificate, or
in plaintext, is refused (API keys never cross the network in clear on one port and not on the other). The
certificates are the gRPC TLS tests' own (made there, in the test)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from eoq.api.server import RunningServer
from tests.api.client import FRANCE
from tests.api.http.conftest import httpx, model_name, serving_http
from tests.api.test_tls import Pki, pki  # noqa: F401  (the fixture)

pytestmark = pytest.mark.asyncio(loop_scope="package")


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def mtls(pki: Pki) -> AsyncIterator[RunningServer]:  # noqa: F811
    async with serving_http(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                            tls_client_ca_file=pki.client_ca) as running:
        yield running


def context(pki: Pki, with_certificate: bool) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if with_certificate:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


async def test_an_https_client_with_a_client_certificate_is_answered(mtls: RunningServer, pki: Pki) -> None:  # noqa: F811
    assert mtls.http.scheme == "https"
    async with httpx.AsyncClient(verify=context(pki, True), timeout=60) as http, openai.AsyncOpenAI(
            base_url=f"https://127.0.0.1:{mtls.http_port}/v1", api_key="unused", http_client=http,
            max_retries=0) as client:
        reply = await client.chat.completions.create(model=model_name(mtls), max_tokens=16,
                                                     messages=[{"role": "user", "content": FRANCE}])
        assert "Paris" in reply.choices[0].message.content


async def test_no_client_certificate_or_plaintext_is_refused(mtls: RunningServer, pki: Pki) -> None:  # noqa: F811
    async with httpx.AsyncClient(verify=context(pki, False), timeout=10) as http:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get(f"https://127.0.0.1:{mtls.http_port}/v1/models")
    async with httpx.AsyncClient(timeout=10) as http:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get(f"http://127.0.0.1:{mtls.http_port}/v1/models")
