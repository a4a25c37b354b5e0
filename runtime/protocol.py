"""Names both ends of the wire share: tensor names, how a stream is named, token variables,
the ready line and the version. Clients (tta ctl, tta demo, tta bench, tests) import this
module, never the server."""
from __future__ import annotations

import json
import re
from importlib import metadata

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STREAM_HEADER = "x-tta-stream-id"    # gRPC metadata naming the stream of a request
STREAM_PARAMETER = "stream_id"       # ... or this request parameter
DEFAULT_STREAM = "default"           # the stream of a request that names none

CONTROL_TOKEN_ENV = "TTA_CONTROL_TOKEN"
INFERENCE_TOKEN_ENV = "TTA_INFERENCE_TOKEN"

# `tta serve` prints one line when it is ready; ports may have been chosen by the OS. Groups:
# 1 host, 2 gRPC port, 3 metrics port (-1: off), 4 REST/HTTP port (-1: off; None from servers
# older than the REST front, whose lines end after the metrics port)
READY_LINE = re.compile(r"ready on (\S+):(\d+) metrics (-?\d+)(?: http (-?\d+))?")


def ready_line(model: str, host: str, port: int, metrics_port: int, note: str, http_port: int = -1) -> str:
    """The line READY_LINE matches (host already bracketed for IPv6)."""
    return f"tta serve: model {model!r} ready on {host}:{port} metrics {metrics_port} http {http_port} ({note})"


def bearer_headers(token: str | None) -> dict[str, str] | None:
    """The authorization header for a bearer token, as tritonclient's headers= takes it; None
    without a token. Inference clients: bearer_headers(os.environ.get(INFERENCE_TOKEN_ENV))."""
    return {"authorization": f"Bearer {token}"} if token else None


# A gRPC retry policy for inference (grpc's service config, gRFC A6) that well-behaved clients
# use: a refusal under load (RESOURCE_EXHAUSTED) was never run, so retrying it is safe, and gRPC
# waits as long as the server's retry pushback says (grpc-retry-pushback-ms) before it does.
# UNAVAILABLE is left out on purpose: a connection lost after the server ran the batch also
# reads UNAVAILABLE, and a retry would teach the stream twice. Pass RETRY_CHANNEL_ARGS as channel
# options (tritonclient: channel_args=, together with its defaults). grpc caps maxAttempts at 5.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]}}]})
RETRY_CHANNEL_ARGS = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]


def _version() -> str:
    try:
        return metadata.version("tta-runtime")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


VERSION = _version()
