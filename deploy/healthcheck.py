"""Container health check: asks eoq's standard gRPC health service whether the chat service is SERVING.

Used by the Dockerfile's HEALTHCHECK and the compose file. It needs only grpcio and grpcio-health-checking
(both eoq dependencies), not the eoq package itself, so it still answers when the server is wedged.

    python healthcheck.py [ADDRESS] [SERVICE]

ADDRESS defaults to 127.0.0.1:$EOQ_PORT (50051 when unset); SERVICE to "chat.v1.ChatService" ("" is the
server as a whole). Exit status 0 when SERVING, 1 otherwise (NOT_SERVING while loading or draining, no
answer, unknown service). Kubernetes does not need this: its probes speak gRPC health natively.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVICE = "chat.v1.ChatService"
TIMEOUT_SECONDS = 3.0


def check(address: str, service: str, timeout: float = TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Return (serving, what to print) for one health Check call against ``address``."""
    with grpc.insecure_channel(address) as channel:
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
    address = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('EOQ_PORT', '50051')}"
    service = argv[2] if len(argv) > 2 else DEFAULT_SERVICE
    serving, message = check(address, service)
    print(message)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
