"""`python -m runtime.healthcheck`: one grpc.health.v1 Check, for Docker HEALTHCHECK and scripts.

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING, unknown service, timeout,
connection refused), with a one-line message. Deliberately small and import-light: Docker runs
it every few seconds, so it must not import torch or the server.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving?, message) for one Check call."""
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"{target} service={service!r}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service={service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:8001", help="server address HOST:PORT")
    p.add_argument("--service", default="", help='health service name ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    ok, message = check(args.target, args.service, args.timeout)
    print(("ok: " if ok else "unhealthy: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
