"""`python -m runtime.healthcheck`: one grpc.health.v1 Check, for Docker HEALTHCHECK and scripts.

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING, unknown service, timeout,
connection refused), with a one-line message. Deliberately small and import-light: Docker runs
it every few seconds, so it must not import torch or the server.

TLS: --tls-ca verifies the server (and turns TLS on); --tls-cert/--tls-key present a client
certificate to a server that requires one (tta serve --tls-client-ca, mutual TLS);
--tls-server-name checks the certificate against this name rather than the host of --target
(probes dial 127.0.0.1, certificates name the service). Each flag falls back to an environment
variable, so the Docker HEALTHCHECK stays one fixed line: set TTA_HEALTHCHECK_TLS_CA,
TTA_HEALTHCHECK_TLS_CERT, TTA_HEALTHCHECK_TLS_KEY, TTA_HEALTHCHECK_TLS_SERVER_NAME (and
TTA_HEALTHCHECK_TARGET) in the container's environment.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV = "TTA_HEALTHCHECK_"  # + TARGET, TLS_CA, TLS_CERT, TLS_KEY, TLS_SERVER_NAME


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel(target: str, tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
            tls_server_name: str | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any TLS file is given."""
    if not (tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                               certificate_chain=_read(tls_cert))
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else None
    return grpc.secure_channel(target, credentials, options=options)


def check(target: str, service: str = "", timeout: float = 3.0, **tls) -> tuple[bool, str]:
    """(serving?, message) for one Check call; tls: channel()'s tls_* arguments."""
    try:
        with channel(target, **tls) as channel_:
            stub = health_pb2_grpc.HealthStub(channel_)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"{target} service={service!r}: {e.code().name}: {e.details()}"
    except (OSError, ValueError) as e:  # a certificate file missing or unreadable, cert without key
        return False, f"{target} service={service!r}: TLS setup: {e}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service={service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.healthcheck", description=__doc__.splitlines()[0])
    env = os.environ.get
    p.add_argument("--target", default=env(ENV + "TARGET") or "127.0.0.1:8001",
                   help=f"server address HOST:PORT (default: ${ENV}TARGET, else 127.0.0.1:8001)")
    p.add_argument("--service", default="", help='health service name ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--tls-ca", default=env(ENV + "TLS_CA") or None,
                   help=f"PEM CA bundle that signed the server's certificate; turns TLS on (${ENV}TLS_CA)")
    p.add_argument("--tls-cert", default=env(ENV + "TLS_CERT") or None,
                   help=f"PEM client certificate, for a server that requires one (${ENV}TLS_CERT)")
    p.add_argument("--tls-key", default=env(ENV + "TLS_KEY") or None,
                   help=f"PEM private key of --tls-cert (${ENV}TLS_KEY)")
    p.add_argument("--tls-server-name", default=env(ENV + "TLS_SERVER_NAME") or None,
                   help=f"name the server's certificate must carry, when it is not --target's host "
                        f"(${ENV}TLS_SERVER_NAME)")
    args = p.parse_args(argv)
    ok, message = check(args.target, args.service, args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, tls_server_name=args.tls_server_name)
    print(("ok: " if ok else "unhealthy: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
