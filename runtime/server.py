"""`tta serve`: the gRPC server.

Services on one port (default 8001, as Triton):
  inference.GRPCInferenceService   Open Inference Protocol, Triton flavour (tritonclient.grpc works)
  tta.v1.AdaptationService         policies, streams, reset, snapshot, rollback, feedback
  grpc.health.v1.Health            SERVING once the model is loaded and warmed up
  grpc.reflection.v1alpha          so grpcurl can list and describe the services
The same Open Inference Protocol over REST (KServe v2 HTTP/JSON, Triton's binary tensors; curl and
tritonclient.http work) on --http-port (default 8000), same engine, TLS and tokens
(runtime/serving/rest.py). Prometheus metrics over HTTP on --metrics-port (default 8002).

SIGTERM / SIGINT: health NOT_SERVING and ServerReady (and /v2/health/ready) false, new inference
answered UNAVAILABLE (HTTP 503),
in-flight RPCs get --grace seconds, pending updates are applied, stream state is checkpointed
to --state-dir, then the process exits 0 (1 when some streams could not be saved; the log names
them). Health service "tta.state" is NOT_SERVING while writes to the state dir fail.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.checkpoints import STATE_KEY_ENV, key_id, load_key
from runtime.coordination.etcd import Etcd, parse_endpoints
from runtime.coordination.ownership import Ownership
from runtime.coordination.peers import Peers
from runtime.engine import Engine, EngineError
from runtime.guard import GuardConfig
from runtime.metrics import Metrics
from runtime.model_config import ConfigError, load
from runtime.preprocess import DECODE_BUDGET_MB, MAX_DECODED_MB, DecodeBudget
from runtime.protocol import CONTROL_TOKEN_ENV, INFERENCE_TOKEN_ENV, ready_line
from runtime.serving import security
from runtime.serving.control import AdaptationService
from runtime.serving.inference import InferenceService
from runtime.serving.rest import RestApp, RestServer, tls_context
from runtime.serving.wire import add_servicer, pb_grpc, tta_grpc

log = logging.getLogger("tta.serve")

# grpc.health.v1 service name whose status says whether the state dir takes writes (durability)
STATE_SERVICE = "tta.state"

EXAMPLES = """examples:
  tta serve                                   # the built-in demo model on 127.0.0.1:8001, metrics :8002
  tta serve --model my_model.toml --host 0.0.0.0 --state-dir /var/lib/tta
  tta serve --policy bn-ema --track cam-1 --track cam-2
  tta serve --port 0 --metrics-port 0 --http-port 0   # free ports, printed on the ready line
  tta serve --http-port -1                    # gRPC only, no REST front
"""


def add_arguments(p) -> None:
    p.add_argument("--model", help="model config TOML, or a directory holding model.toml "
                                   "(default: the built-in demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0: a free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="REST/HTTP port of the Open Inference Protocol (KServe v2 REST, Triton's binary tensors), "
                        "with the same TLS and tokens as gRPC (0: a free port, -1: off; default: 8000)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0: a free port, -1: off)")
    p.add_argument("--policy", help="default policy of new streams (default: the model config's)")
    p.add_argument("--track", action="append", default=[], metavar="STREAM",
                   help="give this stream its own metric labels (repeatable)")
    p.add_argument("--state-dir", help="keep stream state here: evicted streams, snapshots, checkpoint at shutdown, "
                                       "restored at start (default: a temporary directory, nothing kept)")
    p.add_argument("--state-key-file", help=f"sign every state file with this key (HMAC-SHA256; the file's content, "
                                           f"stripped, at least 16 bytes; or ${STATE_KEY_ENV}) and refuse any file "
                                           f"that does not verify under it. Without a key files carry a SHA-256 "
                                           f"checksum only, so the state dir must be trusted (docs/OPERATIONS.md)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--frozen-backend", choices=("torch", "onnx", "auto"), default="auto",
                   help="what runs unadapted `source` streams of a PyTorch model: auto (the default): ONNX Runtime "
                        "where it is exact (the model exported at start with its BatchNorm layers, logits and BN "
                        "input means checked against torch on probe batches), else torch, with one log line why; "
                        "onnx: ONNX Runtime or refuse to start; torch: never ONNX Runtime. Both report the BN-shift "
                        "drift figure. A config's own onnx file is always used")
    p.add_argument("--max-message-mb", type=float, default=64.0,
                   help="largest gRPC message accepted (grpcio's default is 4 MiB); larger: RESOURCE_EXHAUSTED")
    p.add_argument("--max-streams", type=int, default=1024, help="most streams kept; more: RESOURCE_EXHAUSTED")
    p.add_argument("--memory-budget-mb", type=float, default=2048.0,
                   help="adapted state kept in memory; least recently used streams beyond it go to disk")
    p.add_argument("--max-queue", type=int, default=256,
                   help="batches waiting for the engine; more: RESOURCE_EXHAUSTED")
    p.add_argument("--max-queue-wait", type=float, default=30.0, metavar="SECONDS",
                   help="refuse a batch at once (RESOURCE_EXHAUSTED) when the batches ahead of it would take "
                        "longer than this (measured time per batch x batches waiting; 0: no bound; default: 30). "
                        "A batch whose client deadline passes while it waits is never run")
    p.add_argument("--max-stream-queue", type=int, default=64,
                   help="batches of one stream waiting for the engine; more: RESOURCE_EXHAUSTED (one busy "
                        "stream cannot fill the whole queue)")
    p.add_argument("--max-group", type=int, default=64, metavar="BATCHES",
                   help="dynamic batching: queued batches of frozen `source` streams (a stream's consecutive "
                        "batches too), and of source, bn or bn-alpha streams with equal settings and batch shape "
                        "(each normalised with its own statistics), share one forward pass, up to this many "
                        "batches (1: off; default: 64)")
    p.add_argument("--group-samples", type=int, default=64, metavar="SAMPLES",
                   help="a shared forward pass stops growing at this many samples: on the CPU, stacking batches beyond "
                        "about 64 images measured slower than passing them one by one; on a GPU more pays "
                        "(default: 64)")
    p.add_argument("--group-wait-us", type=float, default=1000.0, metavar="MICROSECONDS",
                   help="how long a batch may wait for others to share its forward pass; it waits only while "
                        "batches measurably arrive faster than that and waiting has lately paid, so a lone "
                        "client never waits (0: share only what is already queued; default: 1000)")
    p.add_argument("--checkpoint-interval", type=float, default=30.0, metavar="SECONDS",
                   help="with --state-dir: every this many seconds, checkpoint the streams that changed "
                        "(0: only at eviction and shutdown; default: 30)")
    p.add_argument("--stream-ttl", type=float, default=0.0, metavar="SECONDS",
                   help="forget streams idle for longer than this (memory, state dir and snapshots, as DeleteStream "
                        "does), also across restarts, so a flood of stream ids cannot hold --max-streams for good "
                        "(0: never; default: 0)")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch per request")
    p.add_argument("--max-decoded-mb", type=float, default=MAX_DECODED_MB, metavar="MB",
                   help="pixels one request's JPEG/PNG (and UINT8) images may decode to, at 3 bytes a pixel, read "
                        "from the image headers before decoding; more: INVALID_ARGUMENT (default: %(default)g)")
    p.add_argument("--decode-budget-mb", type=float, default=DECODE_BUDGET_MB, metavar="MB",
                   help="decoded pixels of all requests being decoded at once; a request beyond it is answered "
                        "RESOURCE_EXHAUSTED at once instead of queueing (default: %(default)g)")
    p.add_argument("--guard", choices=("rollback", "reset", "off"), default="rollback",
                   help="collapse guard for weight-updating policies (runtime/guard.py): on non-finite values, a "
                        "collapsed class marginal, runaway weights or a lasting BN-shift jump, roll the stream back "
                        "to its last good state (kept every --guard-snapshot-every healthy updates; reset when "
                        "there is none), or always reset it; label-correlated and small batches are answered with "
                        "the source prediction and not learned from; off: none of it (default: rollback)")
    p.add_argument("--guard-patience", type=int, default=GuardConfig.patience, metavar="BATCHES",
                   help=f"batches in a row a collapse or runaway must last before the guard acts "
                        f"(default: {GuardConfig.patience})")
    p.add_argument("--guard-snapshot-every", type=int, default=GuardConfig.snapshot_every, metavar="UPDATES",
                   help=f"keep a stream's state as its last good snapshot every this many healthy updates "
                        f"(default: {GuardConfig.snapshot_every})")
    p.add_argument("--guard-pin-after", type=int, default=GuardConfig.pin_after, metavar="TRIPS",
                   help=f"escalation: a stream the guard rolls back or resets this many times within "
                        f"--guard-pin-window batches is pinned to --guard-safe-policy (metric tta_guard_pins_total, "
                        f"`tta ctl get` shows it) until an operator sets a policy or resets it "
                        f"(0: never; default: {GuardConfig.pin_after})")
    p.add_argument("--guard-pin-window", type=int, default=GuardConfig.pin_window, metavar="BATCHES",
                   help=f"the window of --guard-pin-after (default: {GuardConfig.pin_window})")
    p.add_argument("--guard-source-every", type=int, default=GuardConfig.source_every, metavar="BATCHES",
                   help=f"on a stream that looks i.i.d. and healthy, the frozen model's forward the guard compares "
                        f"with runs on every n-th batch only (1: every batch; default: {GuardConfig.source_every})")
    p.add_argument("--guard-safe-policy", default=GuardConfig.safe_policy, metavar="POLICY",
                   help=f"what a pinned stream runs, e.g. source (the frozen model) or bn-alpha "
                        f"(default: {GuardConfig.safe_policy})")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get at shutdown")
    p.add_argument("--shutdown-delay", type=float, default=0.0,
                   help="seconds to keep serving after SIGTERM with health NOT_SERVING, so load balancers "
                        "stop routing here before requests are refused")
    p.add_argument("--no-reflection", action="store_true", help="do not enable gRPC server reflection")
    p.add_argument("--tls-cert", help="serve TLS with this PEM certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--control-token-file", help=f"require 'authorization: Bearer <token>' on control RPCs that change "
                                               f"state (token read from this file, or from ${CONTROL_TOKEN_ENV}); "
                                               f"inference and read-only control RPCs stay open")
    p.add_argument("--inference-token-file", help=f"require 'authorization: Bearer <token>' on inference RPCs and "
                                                 f"on read-only control RPCs too (those take this or the control "
                                                 f"token; token read from this file, or from ${INFERENCE_TOKEN_ENV}); "
                                                 f"ServerLive, ServerReady and grpc.health.v1 stay open for probes")
    p.add_argument("--coordinator", metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="several replicas share streams: each stream is held by one replica at a time through "
                        "leases in etcd, checkpoint commits are fenced, and a replica asked for a stream another "
                        "one holds takes it over (docs/OPERATIONS.md, 'Several replicas'). Needs --replica-id, "
                        "--advertise and a --state-dir all replicas share. Default: one process, no etcd")
    p.add_argument("--replica-id", help="this replica's unique, stable name (e.g. the StatefulSet pod name)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="where the other replicas reach this one's gRPC port (to ask it to hand a stream over)")
    p.add_argument("--lease-ttl", type=int, default=10, metavar="SECONDS",
                   help="etcd lease of this replica: a replica that stops renewing it loses its streams after "
                        "this long, and serves its streams no longer than this without reaching etcd (default: 10)")
    p.add_argument("--handoff-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long a request waits for the replica holding its stream to hand it over; beyond: "
                        "UNAVAILABLE naming the holder in trailing metadata `tta-holder` (default: 5)")
    p.add_argument("--log-level", default="INFO")


async def serve(args) -> int:
    try:
        state_key = load_key(args.state_key_file)
    except (OSError, ValueError) as e:
        log.error("state key: %s", e)
        return 2
    try:
        model = load(args.model, device=args.device, default_policy=args.policy, tracked=args.track,
                     frozen_backend=args.frozen_backend)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    metrics = Metrics(model.name, model.tracked_streams)
    try:
        guard = GuardConfig(action=args.guard, patience=args.guard_patience, snapshot_every=args.guard_snapshot_every,
                            pin_after=args.guard_pin_after, pin_window=args.guard_pin_window,
                            safe_policy=args.guard_safe_policy, source_every=args.guard_source_every)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if args.max_group < 1 or args.group_samples < 1 or args.group_wait_us < 0:
        log.error("--max-group and --group-samples must be at least 1, --group-wait-us at least 0")
        return 2
    if state_key is not None:
        log.info("state files are signed and verified with the state key (key id %s)", key_id(state_key).hex())
    elif args.state_dir:
        log.info("state files carry a SHA-256 checksum but no signature (no --state-key-file): the state dir "
                 "must be writable by trusted parties only")
    try:
        ownership = _coordination(args, model, metrics)
    except (ValueError, ConnectionError) as e:
        log.error("--coordinator: %s", e)
        return 2
    engine = Engine(model, metrics, state_dir=args.state_dir, max_streams=args.max_streams,
                    memory_budget_bytes=int(args.memory_budget_mb * 2**20), max_queue=args.max_queue,
                    guard=guard, max_stream_queue=args.max_stream_queue,
                    checkpoint_interval=args.checkpoint_interval, max_group=args.max_group,
                    group_samples=args.group_samples, group_wait=args.group_wait_us / 1e6,
                    max_queue_wait=args.max_queue_wait, stream_ttl=args.stream_ttl, state_key=state_key,
                    ownership=ownership, handoff_timeout=args.handoff_timeout)
    log.info("model %r loaded: %s on %s, input [N, %d, %d, %d], %d classes%s", model.name, model.platform,
             model.device, model.channels, model.height, model.width, model.num_classes,
             "" if model.can_adapt() else " (frozen: source policy only)")
    try:
        engine.check_policy(model.default_policy, model.default_hyperparameters)  # before we say SERVING
        engine.check_policy(guard.safe_policy, {})
    except EngineError as e:
        log.error("default policy or --guard-safe-policy: %s", e.message)
        engine.close()
        return 2

    max_bytes = int(args.max_message_mb * 2**20)
    auth, token, inference_token = security.interceptors(args.control_token_file, args.inference_token_file)
    server = grpc.aio.server(interceptors=auth, options=[
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ])
    decodes = DecodeBudget(int(args.max_decoded_mb * 2**20), int(args.decode_budget_mb * 2**20),
                           refuse=lambda message: EngineError("RESOURCE_EXHAUSTED", message))
    inference = InferenceService(model, engine, args.max_batch, decodes)
    # the generated handler tables, with request deserializers that never raise (wire.add_servicer)
    add_servicer(pb_grpc.add_GRPCInferenceServiceServicer_to_server, inference, server)
    add_servicer(tta_grpc.add_AdaptationServiceServicer_to_server, AdaptationService(model, engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = ["inference.GRPCInferenceService", "tta.v1.AdaptationService"]
    if not args.no_reflection:
        reflection.enable_server_reflection(
            services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host  # IPv6
    address = f"{host}:{args.port}"
    try:
        credentials = security.tls_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except (OSError, ValueError) as e:
        log.error("TLS: %s", e)
        engine.close()
        return 2
    except RuntimeError as e:
        port, why = 0, str(e)
    else:
        why = "port in use or address not available"
    if not port:
        log.error("cannot listen on %s (%s); is another server running? choose another --port", address, why)
        engine.close()
        return 1

    metrics_http, metrics_port = None, -1
    if args.metrics_port >= 0:
        try:
            metrics_http = metrics.serve_http(args.metrics_port, args.host)
            metrics_port = metrics_http.server_port
        except OSError as e:
            log.error("cannot serve metrics on %s:%d (%s); choose another --metrics-port or -1", args.host,
                      args.metrics_port, e)
            engine.close()
            return 1

    rest, http_port = None, -1
    if args.http_port >= 0:  # the REST front: same engine, tokens, TLS and message limit
        rest = RestServer(RestApp(inference, auth[0] if auth else None, max_bytes))
        try:
            http_port = await rest.start(args.host, args.http_port,
                                         tls_context(args.tls_cert, args.tls_key, args.tls_client_ca))
        except OSError as e:  # ssl.SSLError too
            log.error("cannot serve REST on %s:%d (%s); choose another --http-port or -1", args.host,
                      args.http_port, e)
            if metrics_http is not None:
                metrics_http.shutdown()
            engine.close()
            return 1

    await server.start()
    for name in ["", *services]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if token:
        log.info("control RPCs that change state require the control bearer token")
    if inference_token:
        log.info("inference RPCs (but ServerLive/ServerReady) and read-only control RPCs require the inference "
                 "bearer token%s", " (or, for control, the control token)" if token else "")
    policy_note = f"default policy {model.default_policy}" + (f"; {'; '.join(model.notes)}" if model.notes else "")
    # One parseable line for scripts and tests (ports may have been chosen by the OS).
    tls_note = "; TLS" + (" with client certificates" if args.tls_client_ca else "") if args.tls_cert else ""
    print(ready_line(model.name, host, port, metrics_port, policy_note + tls_note, http_port), flush=True)

    watcher = asyncio.create_task(_watch_durability(engine, health_servicer))
    await stop.wait()
    watcher.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: stop now, without the checkpoint
        loop.add_signal_handler(sig, _exit_now)
    log.info("shutting down: NOT_SERVING, draining for up to %.0f s (signal again to exit at once)", args.grace)
    inference.ready = False
    await health_servicer.enter_graceful_shutdown()
    if args.shutdown_delay > 0:
        await asyncio.sleep(args.shutdown_delay)
    engine.stop_accepting()  # new batches: UNAVAILABLE; queued ones still complete
    # Answer what is queued while the transport still takes calls (late arrivals get our
    # UNAVAILABLE, which clients retry, instead of gRPC's CANCELLED), then close it.
    started = time.monotonic()
    await engine.wait_idle(args.grace)
    left = max(args.grace - (time.monotonic() - started), 1.0)
    await asyncio.gather(server.stop(left), rest.stop(left) if rest else asyncio.sleep(0))  # REST closes with gRPC
    saved, failed = await engine.drain_and_checkpoint()
    if engine.persistent:
        log.info("checkpointed %d streams to %s", saved, engine.store.root)
    if failed:  # their adapted state since their last checkpoint is lost: say which
        log.error("%d streams could not be checkpointed and lose what they learned since their last "
                  "checkpoint: %s", len(failed), ", ".join(repr(s) for s in failed))
    engine.close()
    if metrics_http is not None:
        metrics_http.shutdown()
    log.info("stopped")
    return 1 if failed else 0


def _coordination(args, model, metrics) -> Ownership | None:
    """The replica's stream ownership through etcd, started (its lease taken); None without --coordinator."""
    if not args.coordinator:
        return None
    missing = [flag for flag, value in (("--replica-id", args.replica_id), ("--advertise", args.advertise),
                                        ("--state-dir", args.state_dir)) if not value]
    if missing:
        raise ValueError(f"replicas need {', '.join(missing)} too (a unique name, the address the others reach "
                         f"this one at, and the state dir they share)")
    if args.lease_ttl < 2:
        raise ValueError("--lease-ttl must be at least 2 seconds")
    client = Etcd(parse_endpoints(args.coordinator))
    roots = None
    if args.tls_cert:  # replicas reach each other as clients do: over TLS, trusting our CA (or certificate)
        with open(args.tls_client_ca or args.tls_cert, "rb") as f:
            roots = f.read()
    peers = Peers(model.name, security.read_token(args.control_token_file, CONTROL_TOKEN_ENV), roots)
    ownership = Ownership(client, model.name, args.replica_id, args.advertise, args.lease_ttl, metrics,
                          peers.ask_release)
    ownership.start()
    log.info("replica %s (advertised at %s): streams held through etcd at %s, lease %d s", args.replica_id,
             args.advertise, args.coordinator, args.lease_ttl)
    return ownership


async def _watch_durability(engine: Engine, health_servicer, every: float = 1.0) -> None:
    """Health service STATE_SERVICE follows the state dir: NOT_SERVING while writes to it fail."""
    shown = None
    while True:
        if engine.durable != shown:
            shown = engine.durable
            await health_servicer.set(STATE_SERVICE, health_pb2.HealthCheckResponse.SERVING if shown
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(every)


def _exit_now() -> None:
    log.warning("second signal: exiting without draining or checkpointing")
    logging.shutdown()
    os._exit(1)


def run(args) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(serve(args))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime.server", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
