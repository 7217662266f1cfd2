"""Container health check: asks eoq's standard gRPC health service whether the chat service is SERVING.

Used by the Dockerfile's HEALTHCHECK and the compose file. It needs grpcio, grpcio-health-checking and the
clients' channel helper (eoq_clients.common, installed with eoq in the image), never the server's modules:
it starts in a fraction of a second and answers whatever state the server is in.

    python healthcheck.py [ADDRESS] [SERVICE] [--tls] [--ca-file PATH] [--client-cert-file PATH
                          --client-key-file PATH] [--tls-server-name NAME]

ADDRESS defaults to 127.0.0.1:$EOQ_PORT (50051 when unset); SERVICE to "chat.v1.ChatService" ("" is the
server as a whole). Against a TLS server pass --tls (system roots) or --ca-file, or set EOQ_TLS=1 /
EOQ_CA_FILE (then the image's HEALTHCHECK line need not change); a server whose certificate does not name
127.0.0.1 needs --tls-server-name; an mTLS server a client certificate. Exit status 0 when SERVING, 1
otherwise (NOT_SERVING while loading or draining, no answer, unknown service, a failed TLS handshake), 2 for
bad TLS flags. Kubernetes needs this only with TLS at the pod: its native gRPC probes speak plaintext only.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eoq.errors import ConfigError
from eoq_clients.common import PLAINTEXT, TransportSecurity, add_tls_flags, open_channel

DEFAULT_SERVICE = "chat.v1.ChatService"
TIMEOUT_SECONDS = 3.0


def check(address: str, service: str, timeout: float = TIMEOUT_SECONDS,
          security: TransportSecurity = PLAINTEXT) -> tuple[bool, str]:
    """Return (serving, what to print) for one health Check call against ``address``."""
    with open_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{address} {service or '(server)'}: {e.code().name} {e.details() or ''}".rstrip()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (
        reply.status == health_pb2.HealthCheckResponse.SERVING,
        f"{address} {service or '(server)'}: {status}",
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=f"127.0.0.1:{os.environ.get('EOQ_PORT', '50051')}")
    parser.add_argument("service", nargs="?", default=DEFAULT_SERVICE)
    add_tls_flags(parser)
    args = parser.parse_args(argv[1:])
    try:
        serving, message = check(args.address, args.service, security=TransportSecurity.from_args(args))
    except ConfigError as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
