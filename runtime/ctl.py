"""`tta ctl`: a command-line client for tta.v1.AdaptationService (a running `tta serve`).

Uses only the tta.v1 stubs, so it can share a process with tritonclient.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import grpc

from runtime import protos
from runtime.protocol import CONTROL_TOKEN_ENV, bearer_headers

EXAMPLES = """examples:
  tta ctl policies                              # what a stream can run, with hyperparameters
  tta ctl set-policy cam-1 cotta lr=0.0005      # validated; applied between two batches
  tta ctl streams                               # every stream: policy, step, drift, accuracy
  tta ctl streams --policy tent --prefix cam- --limit 20
  tta ctl get cam-1 --json
  tta ctl watch cam-1 --every 1                 # drift and accuracy live, one line a second
  tta ctl snapshot cam-1 --name before-night
  tta ctl rollback cam-1 --name before-night    # or without --name: the latest snapshot
  tta ctl reset cam-1                           # back to the source state, policy kept
  tta ctl delete cam-1
  tta ctl feedback req-42 3 1 7                 # true labels of request req-42, one per sample
  tta ctl streams --target 10.0.0.5:8001         # global options go before or after the action
"""


def _global_options(p, defaults: bool = True) -> None:
    """The options every action takes. On the top-level parser with their defaults; on each
    action's parser again with no default (SUPPRESS), so that one given after the action
    (`tta ctl streams --target HOST:PORT`) overrides and one left out keeps the top level's."""
    d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    p.add_argument("--target", default=d("127.0.0.1:8001"), help="server address HOST:PORT")
    p.add_argument("--model", default=d(""), help="model name (default: the server's only model)")
    p.add_argument("--timeout", type=float, default=d(30.0), help="seconds to wait for an answer")
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON (one document)")
    p.add_argument("--tls-ca", default=d(None), help="PEM CA bundle to verify a TLS server (turns TLS on)")
    p.add_argument("--tls-cert", default=d(None),
                   help="PEM client certificate, for servers that require one (mutual TLS)")
    p.add_argument("--tls-key", default=d(None), help="PEM private key of --tls-cert")
    p.add_argument("--token", default=d(os.environ.get(CONTROL_TOKEN_ENV)),
                   help=f"bearer token for servers started with a control token (default: ${CONTROL_TOKEN_ENV})")


class _ActionParser(argparse.ArgumentParser):
    """The parser of one action: also takes the global options (_global_options), whoever adds
    the action. An option of the action's own with the same name wins (conflict_handler)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        _global_options(self, defaults=False)


def add_arguments(p) -> None:
    _global_options(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_ActionParser)
    sub.add_parser("policies", help="list policies and their hyperparameters")
    sp = sub.add_parser("set-policy", help="set a stream's policy: STREAM POLICY [key=value ...]")
    sp.add_argument("stream")
    sp.add_argument("policy")
    sp.add_argument("hyperparameters", nargs="*", metavar="key=value")
    sp = sub.add_parser("streams", help="list streams, sorted by id (filters: --policy, --prefix, --limit)")
    sp.add_argument("--policy", action="append", default=[], metavar="POLICY",
                    help="only streams running this policy (repeatable)")
    sp.add_argument("--prefix", default="", help="only streams whose id starts with this")
    sp.add_argument("--limit", type=int, default=0, metavar="N",
                    help="show the first N (by stream id) and say how many were left out (0: all)")
    sp = sub.add_parser("watch", help="show a stream's drift and accuracy live, one line per interval (Ctrl-C ends)")
    sp.add_argument("stream")
    sp.add_argument("--every", type=float, default=2.0, metavar="SECONDS", help="seconds between two looks")
    sp.add_argument("--count", type=int, default=0, metavar="N", help="stop after N lines (0: until Ctrl-C)")
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
    sp = sub.add_parser("export", help="save a stream's adapted model to a local file: an ONNX graph of what it "
                                       "answers now, or its weights as safetensors where eval mode reproduces it")
    sp.add_argument("stream")
    sp.add_argument("--format", choices=("onnx", "safetensors"), default="onnx", help="file format (default: onnx)")
    sp.add_argument("--out", required=True, metavar="FILE", help="where this client writes the file")


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


UNMIX_TNS_NOTE = (
    "note: unmix-tns loses accuracy on the demo model, even on clean data (1024 clean images: bn 93.2 %, "
    "unmix-tns 87.4 %, 93.5 % with init_noise=0): it mixes per-image statistics in, and on images of small "
    "objects on a plain background those carry the class. Compare it with bn on your own data (tta replay) "
    "before relying on it; docs/POLICIES.md, \"Measured on the demo model\".")


def run(args) -> int:
    """One action; output cut short by a closed pipe (`tta ctl streams | head`) ends quietly, exit 0."""
    try:
        code = _run(args)
        sys.stdout.flush()  # here, not at interpreter exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:
        # what is left in the buffer goes nowhere: point stdout at /dev/null so the final flush is silent
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def _select_streams(streams, args) -> tuple[list, int]:
    """The streams --policy/--prefix keep, sorted by id and cut to --limit; and how many matched."""
    policies = set(args.policy)
    matched = sorted((s for s in streams if (not policies or s.policy in policies)
                      and s.stream_id.startswith(args.prefix)), key=lambda s: s.stream_id)
    return (matched[:args.limit] if args.limit > 0 else matched), len(matched)


WATCH_HEADER = (f"{'time':8}  {'policy':12} {'step':>6} {'batches':>7} {'bn_shift':>8} {'entropy':>7} "
                f"{'confid.':>7} {'weights':>7} {'accuracy':>17} {'since last':>15} {'guard':>5}")


def _watch_line(s, previous) -> str:
    """One row of `tta ctl watch`: the stream now, accuracy overall and since the previous row."""
    accuracy = f"{s.accuracy:.3f} ({s.feedback_correct}/{s.feedback_labels})" if s.feedback_labels else "-"
    labels = s.feedback_labels - (previous.feedback_labels if previous is not None else 0)
    correct = s.feedback_correct - (previous.feedback_correct if previous is not None else 0)
    recent = f"{correct / labels:.3f} ({correct}/{labels})" if previous is not None and labels > 0 else "-"
    notes = (f"  held by {s.holder}" if s.holder else "") + \
        (f"  PINNED by the guard (was {s.pinned_from})" if s.pinned_from else "") + \
        ("" if s.resident else "  on disk")
    return (f"{time.strftime('%H:%M:%S')}  {s.policy:12} {s.step:>6} {s.batches:>7} {s.bn_shift:>8.3f} "
            f"{s.entropy:>7.3f} {s.confidence:>7.3f} {s.weight_distance:>7.4f} {accuracy:>17} {recent:>15} "
            f"{s.guard_trips:>5}{notes}")


def _watch(stub, pb, args) -> int:
    """`tta ctl watch STREAM`: GetStream every --every seconds, one table row each; Ctrl-C ends quietly.
    Ctrl-C sets a flag rather than raising: a KeyboardInterrupt raised inside a blocking gRPC call
    can be lost there, and the watch went on (seen on a loaded machine)."""
    request = pb.StreamRequest(model=args.model, stream_id=args.stream)
    previous, shown, stop = None, 0, threading.Event()
    before = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.is_set():
            info = stub.GetStream(request, timeout=args.timeout)
            if args.json:
                print(json.dumps(_message_to_dict(info)), flush=True)  # one JSON document per line
            else:
                if previous is None:
                    print(f"stream {info.stream_id} on {args.target}, every {args.every:g} s"
                          f"{'' if args.count else ' (Ctrl-C ends)'}; accuracy needs feedback labels\n{WATCH_HEADER}")
                print(_watch_line(info, previous), flush=True)
            previous, shown = info, shown + 1
            if args.count and shown >= args.count:
                return 0
            stop.wait(max(args.every, 0.05))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, before)
    print()
    return 0


def _export(stub, pb, args) -> int:
    """`tta ctl export STREAM --format F --out FILE`: the server streams the file back; only this client
    writes it, to FILE.part, renamed to FILE once its size and SHA-256 match what the server sent."""
    import hashlib

    chunks = stub.ExportStream(pb.ExportRequest(model=args.model, stream_id=args.stream, format=args.format),
                               timeout=args.timeout)
    partial, first, size, digest = f"{args.out}.part", None, 0, hashlib.sha256()
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                first = chunk if first is None else first
                f.write(chunk.data)
                digest.update(chunk.data)
                size += len(chunk.data)
        complete = first is not None and size == first.total_bytes and digest.hexdigest() == first.sha256
        if complete:
            os.replace(partial, args.out)
    except OSError as e:
        print(f"tta ctl export: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:  # a refusal, a broken connection or a damaged file leaves nothing behind
        if os.path.exists(partial):
            os.remove(partial)
    if not complete:
        print(f"tta ctl export: the file arrived incomplete or damaged ({size} bytes"
              f"{f' of {first.total_bytes}' if first is not None else ''}); nothing written", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"stream_id": args.stream, "file": args.out, "bytes": size, "sha256": first.sha256,
                          "format": first.format, "policy": first.policy, "step": first.step,
                          "file_name": first.file_name, "note": first.note}, indent=2))
    else:
        print(f"exported stream {args.stream} ({first.policy}, step {first.step}) as {first.format}: {size} bytes "
              f"written to {args.out}\n  {first.note}")
    return 0


def _run(args) -> int:
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
            elif a == "watch":
                return _watch(stub, pb, args)
            elif a == "export":
                return _export(stub, pb, args)
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
    if a == "set-policy" and (args.policy == "unmix-tns" or "norm=unmix-tns" in args.hyperparameters):
        print(UNMIX_TNS_NOTE, file=sys.stderr)
    if a == "streams":
        streams, matched = _select_streams(reply.streams, args)
    if args.json:
        document = _message_to_dict(reply)
        if a == "streams":
            document.update(streams=[_message_to_dict(s) for s in streams], matched=matched,
                            not_shown=matched - len(streams))
        print(json.dumps(document, indent=2))
        return 0
    if a == "policies":
        for p in reply.policies:
            marker = "" if p.name in reply.supported else "  (not available for this model)"
            print(f"{p.name}{marker}\n  {p.summary}")
            for h in p.hyperparameters:
                print(f"    {h.name} = {h.default_value}  (valid: {h.range})  {h.meaning}")
    elif a == "streams":
        filters = ([f"--policy {','.join(args.policy)}"] if args.policy else []) + \
            ([f"--prefix {args.prefix}"] if args.prefix else [])
        print(f"{len(reply.streams)} streams (limit {reply.stream_limit}, memory budget "
              f"{reply.memory_budget_bytes / 2**20:.0f} MiB)"
              + (f"; {matched} match {' '.join(filters)}" if filters else ""))
        for s in streams:
            _print_stream(s)
        if matched > len(streams):
            print(f"... {matched - len(streams)} more not shown (--limit {args.limit}; sorted by stream id)")
    elif a == "snapshot":
        print(f"snapshot {reply.name!r} of {reply.stream.stream_id} saved (step {reply.stream.step})")
    elif a == "delete":
        hp = " ".join(f"{k}={v}" for k, v in sorted(reply.hyperparameters.items()))
        snapshots = f"{len(reply.snapshots)} snapshot{'s' if len(reply.snapshots) != 1 else ''}" + \
            (f" ({', '.join(reply.snapshots)})" if reply.snapshots else "")
        print(f"deleted stream {reply.stream_id}: policy {reply.policy}{' ' + hp if hp else ''}, {reply.batches} "
              f"batches ({reply.samples} samples, step {reply.step}), {snapshots}.\n"
              f"  Its adapted state ({'in memory and ' if reply.resident else ''}on disk) and its snapshot files "
              f"are gone; the next request naming it starts a new stream from the source model.")
    elif a == "feedback":
        print(f"{reply.correct}/{reply.total} correct on stream {reply.stream_id} ({reply.policy}); "
              f"stream accuracy {reply.stream_accuracy:.3f}")
    else:
        _print_stream(reply)
    return 0
