"""`tta ctl`: a command-line client for tta.v1.AdaptationService (a running `tta serve`).

Uses only the tta.v1 stubs, so it can share a process with tritonclient.
"""
from __future__ import annotations

import json
import os
import sys

import grpc

from runtime import protos
from runtime.protocol import CONTROL_TOKEN_ENV, bearer_headers

EXAMPLES = """examples:
  tta ctl policies                              # what a stream can run, with hyperparameters
  tta ctl set-policy cam-1 cotta lr=0.0005      # validated; applied between two batches
  tta ctl streams                               # every stream: policy, step, drift, accuracy
  tta ctl --json get cam-1
  tta ctl snapshot cam-1 --name before-night
  tta ctl rollback cam-1 --name before-night    # or without --name: the latest snapshot
  tta ctl reset cam-1                           # back to the source state, policy kept
  tta ctl delete cam-1
  tta ctl feedback req-42 3 1 7                 # true labels of request req-42, one per sample
  tta ctl --target 10.0.0.5:8001 streams
"""


def add_arguments(p) -> None:
    p.add_argument("--target", default="127.0.0.1:8001", help="server address HOST:PORT")
    p.add_argument("--model", default="", help="model name (default: the server's only model)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--tls-ca", help="PEM CA bundle to verify a TLS server (turns TLS on)")
    p.add_argument("--tls-cert", help="PEM client certificate, for servers that require one (mutual TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token", default=os.environ.get(CONTROL_TOKEN_ENV),
                   help=f"bearer token for servers started with a control token (default: ${CONTROL_TOKEN_ENV})")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("policies", help="list policies and their hyperparameters")
    sp = sub.add_parser("set-policy", help="set a stream's policy: STREAM POLICY [key=value ...]")
    sp.add_argument("stream")
    sp.add_argument("policy")
    sp.add_argument("hyperparameters", nargs="*", metavar="key=value")
    sub.add_parser("streams", help="list streams")
    for name, text in (("get", "one stream's state"), ("reset", "reset a stream to the source state"),
                       ("delete", "forget a stream (memory, disk, snapshots)")):
        sub.add_parser(name, help=text).add_argument("stream")
    sp = sub.add_parser("snapshot", help="save a stream's adapted state under a name")
    sp.add_argument("stream")
    sp.add_argument("--name", default="", help="snapshot name (default: snap-N)")
    sp = sub.add_parser("rollback", help="restore a snapshot (default: the latest)")
    sp.add_argument("stream")
    sp.add_argument("--name", default="")
    sp = sub.add_parser("feedback", help="true labels for a request id, one per sample")
    sp.add_argument("request_id")
    sp.add_argument("labels", nargs="+", type=int)


def _message_to_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_stream(s) -> None:
    hp = " ".join(f"{k}={v}" for k, v in sorted(s.hyperparameters.items()))
    accuracy = f"{s.accuracy:.3f} ({s.feedback_correct}/{s.feedback_labels})" if s.feedback_labels else "-"
    print(f"{s.stream_id}: policy {s.policy}{' ' + hp if hp else ''}; step {s.step}, {s.batches} batches, "
          f"{s.samples} samples; {'in memory' if s.resident else 'on disk'}, {s.state_bytes} B state"
          f"{f', held by replica {s.holder}' if s.holder else ''}"
          f"{f'; PINNED by the collapse guard (was {s.pinned_from}; set-policy or reset unpins)' if s.pinned_from else ''}\n"
          f"  bn_shift {s.bn_shift:.3f}  entropy {s.entropy:.3f}  confidence {s.confidence:.3f}  "
          f"class-marginal entropy {s.class_marginal_entropy:.3f}  weight distance {s.weight_distance:.4f}  "
          f"loss {s.last_loss:.4f}\n  accuracy {accuracy}; snapshots: {', '.join(s.snapshots) or 'none'}; "
          f"guard: {s.guard_trips} rollbacks/resets, {s.guard_fallbacks} batches answered by the source")


def _parse_hyperparameters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"hyperparameter {item!r} must look like key=value, e.g. lr=0.001")
        out[key] = value
    return out


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _channel(args):
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read(args.tls_ca), private_key=_read(args.tls_key),
                                               certificate_chain=_read(args.tls_cert))
    return grpc.secure_channel(args.target, credentials)


class WithMetadata:
    """The stub, with the authorization metadata added to every call."""

    def __init__(self, stub, metadata):
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name):
        rpc = getattr(self._stub, name)
        return lambda request, **kw: rpc(request, metadata=self._metadata, **kw)


def run(args) -> int:
    pb = protos.load("tta.v1.adaptation_pb2")
    pb_grpc = protos.load("tta.v1.adaptation_pb2_grpc")
    metadata = list(bearer_headers(args.token).items()) if args.token else None
    with _channel(args) as channel:
        stub = WithMetadata(pb_grpc.AdaptationServiceStub(channel), metadata)
        m, t = args.model, args.timeout
        try:
            a = args.action
            if a == "policies":
                reply = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=t)
            elif a == "set-policy":
                reply = stub.SetPolicy(pb.SetPolicyRequest(model=m, stream_id=args.stream, policy=args.policy,
                                                           hyperparameters=_parse_hyperparameters(args.hyperparameters)),
                                       timeout=t)
            elif a == "streams":
                reply = stub.ListStreams(pb.ListStreamsRequest(model=m), timeout=t)
            elif a in ("get", "reset", "delete"):
                rpc = {"get": stub.GetStream, "reset": stub.ResetStream, "delete": stub.DeleteStream}[a]
                reply = rpc(pb.StreamRequest(model=m, stream_id=args.stream), timeout=t)
            elif a == "snapshot":
                reply = stub.Snapshot(pb.SnapshotRequest(model=m, stream_id=args.stream, name=args.name), timeout=t)
            elif a == "rollback":
                reply = stub.Rollback(pb.RollbackRequest(model=m, stream_id=args.stream, name=args.name), timeout=t)
            else:
                reply = stub.Feedback(pb.FeedbackRequest(model=m, request_id=args.request_id, labels=args.labels),
                                      timeout=t)
        except grpc.RpcError as e:
            print(f"tta ctl {args.action}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(_message_to_dict(reply), indent=2))
        return 0
    if a == "policies":
        for p in reply.policies:
            marker = "" if p.name in reply.supported else "  (not available for this model)"
            print(f"{p.name}{marker}\n  {p.summary}")
            for h in p.hyperparameters:
                print(f"    {h.name} = {h.default_value}  (valid: {h.range})  {h.meaning}")
    elif a == "streams":
        print(f"{len(reply.streams)} streams (limit {reply.stream_limit}, memory budget "
              f"{reply.memory_budget_bytes / 2**20:.0f} MiB)")
        for s in reply.streams:
            _print_stream(s)
    elif a == "snapshot":
        print(f"snapshot {reply.name!r} of {reply.stream.stream_id} saved (step {reply.stream.step})")
    elif a == "feedback":
        print(f"{reply.correct}/{reply.total} correct on stream {reply.stream_id} ({reply.policy}); "
              f"stream accuracy {reply.stream_accuracy:.3f}")
    else:
        _print_stream(reply)
    return 0
