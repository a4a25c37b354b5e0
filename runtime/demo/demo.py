"""`tta demo`: watch adaptation pay off on a drifting stream.

Starts `tta serve` with the built-in demo model in a subprocess (or uses --target), then plays
the shipped Fashion-MNIST slice as one drifting stream — clean first, then corruptions of
rising severity — through the stock `tritonclient.grpc` streaming API, once per policy: every
batch goes to the streams demo-source, demo-bn, demo-tent, demo-cotta (one gRPC stream
each), and the true labels are fed back (tta.v1 Feedback), so the server computes online
accuracy per stream and policy. Live accuracy is shown side by side as it goes; a summary
table ends the run. Prometheus metrics of the run are on the server's metrics port.

The server runs in its own process (runtime/demo/launcher.py) because tritonclient and the
server's protocol stubs cannot share one (both register the `inference.*` protobuf symbols).
"""
from __future__ import annotations

import os
import queue
import time

import numpy as np

from runtime.console import Progress, table
from runtime.demo.launcher import LocalServer, ServerNotReady
from runtime.lab.datasets import load_demo_slice, load_split, to_model_input
from runtime.protocol import CONTROL_TOKEN_ENV, INFERENCE_TOKEN_ENV, INPUT_NAME, STREAM_PARAMETER, bearer_headers

EXAMPLES = """examples:
  tta demo                                     # start a server, play the default drift, 4 policies
  tta demo --policies source,bn,bn-ema,tent --batch-size 32
  tta demo --phases clean,fog:3,gaussian_noise:5 --samples-per-phase 1000
  tta demo --target 127.0.0.1:8001             # use a running `tta serve` (demo model)
"""

DEFAULT_POLICIES = "source,bn,tent,cotta"
DEFAULT_PHASES = "clean,brightness:2,fog:3,contrast:4,defocus_blur:5,gaussian_noise:5"


def add_arguments(p) -> None:
    p.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--model", help="model config for the started server (default: the built-in demo model); "
                                   "it must take the demo's 3x32x32 Fashion-MNIST input")
    p.add_argument("--model-name", default="demo", help="model name on the server")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policies, one stream each")
    p.add_argument("--phases", default=DEFAULT_PHASES,
                   help="comma-separated drift phases: clean or CORRUPTION:SEVERITY (1-5)")
    p.add_argument("--samples-per-phase", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--metrics-port", type=int, default=0, help="metrics port of the started server (0: a free port)")
    p.add_argument("--port", type=int, default=0, help="gRPC port of the started server (0: a free port)")
    p.add_argument("--seed", type=int, default=0)


def parse_phases(text: str) -> list[tuple[str, int]]:
    from runtime.lab.corruptions import CORRUPTIONS  # cv2: not on the `--help` path

    phases = []
    for item in text.split(","):
        item = item.strip()
        if item == "clean":
            phases.append(("clean", 0))
            continue
        name, _, severity = item.partition(":")
        if name not in CORRUPTIONS or severity not in ("1", "2", "3", "4", "5"):
            raise SystemExit(f"phase {item!r}: use 'clean' or CORRUPTION:SEVERITY with severity 1-5; "
                             f"corruptions: {', '.join(CORRUPTIONS)}")
        phases.append((name, int(severity)))
    return phases


class PolicyStream:
    """One policy: a tritonclient gRPC stream sending to server stream `demo-<policy>`."""

    def __init__(self, target: str, model: str, policy: str):
        import tritonclient.grpc as tc

        self.tc, self.model, self.policy = tc, model, policy
        self.stream_id = f"demo-{policy}"
        self.replies: queue.Queue = queue.Queue()
        self.client = tc.InferenceServerClient(target)
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)),
                                 headers=bearer_headers(os.environ.get(INFERENCE_TOKEN_ENV)))

    def send(self, x: np.ndarray, request_id: str) -> None:
        inp = self.tc.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        self.client.async_stream_infer(self.model, [inp], request_id=request_id,
                                       parameters={STREAM_PARAMETER: self.stream_id})

    def receive(self, timeout: float = 600):
        result, error = self.replies.get(timeout=timeout)
        if error is not None:
            raise SystemExit(f"stream {self.stream_id}: {error}")
        return result

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def run(args) -> int:
    import grpc

    from runtime import protos
    from runtime.ctl import WithMetadata
    from runtime.lab.corruptions import corrupt

    pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    phases = parse_phases(args.phases)
    try:
        x_all, y_all = load_demo_slice()
    except FileNotFoundError as missing:  # fall back to the full test split when installed
        try:
            raw, y_all = load_split("test")
        except FileNotFoundError:
            raise SystemExit(str(missing)) from None
        x_all = to_model_input(raw)
    rng = np.random.default_rng(args.seed)

    server = None
    if args.target:
        target, metrics_note = args.target, "the server's --metrics-port"
    else:
        print("starting `tta serve` with the demo model ...", flush=True)
        try:
            server = LocalServer(*(("--model", args.model) if args.model else ()), port=args.port,
                                 metrics_port=args.metrics_port)
        except ServerNotReady as e:
            raise SystemExit(str(e)) from None
        target = server.target
        metrics_note = (f"http://127.0.0.1:{server.metrics_port}/metrics" if server.metrics_port >= 0 else "off")
    print(f"server {target}; Prometheus metrics: {metrics_note}")
    streams = []
    try:
        channel = grpc.insecure_channel(target)
        token = os.environ.get(CONTROL_TOKEN_ENV)  # a started server inherits it too
        control = WithMetadata(pb_grpc.AdaptationServiceStub(channel),
                               list(bearer_headers(token).items()) if token else None)
        for policy in policies:
            try:
                control.SetPolicy(pb.SetPolicyRequest(model=args.model_name, stream_id=f"demo-{policy}", policy=policy),
                                  timeout=60)
            except grpc.RpcError as e:
                raise SystemExit(f"cannot set policy {policy!r}: {e.details()}") from None
            streams.append(PolicyStream(target, args.model_name, policy))
        print(f"{len(policies)} streams, one per policy; {len(phases)} phases of {args.samples_per_phase} images, "
              f"batches of {args.batch_size}; labels fed back after each batch\n")

        results: dict[str, dict[str, float]] = {}
        drift: dict[str, float] = {}
        started = time.monotonic()
        request_number = 0
        for phase_name, severity in phases:
            label = phase_name if phase_name == "clean" else f"{phase_name}:{severity}"
            idx = rng.permutation(len(x_all))[:args.samples_per_phase]
            x_phase, y_phase = x_all[idx], y_all[idx]
            if phase_name != "clean":
                x_phase = corrupt(x_phase, phase_name, severity, seed=args.seed).astype(np.float32)
            correct = {p: 0 for p in policies}
            shifts = []  # label-free drift signal the server reports with every reply
            seen = 0
            bar = Progress(total=len(x_phase), desc=f"{label:<18}")
            for start in range(0, len(x_phase), args.batch_size):
                xb = np.ascontiguousarray(x_phase[start:start + args.batch_size], dtype=np.float32)
                yb = y_phase[start:start + args.batch_size]
                ids = {}
                for s in streams:  # the same batch to every policy's stream, all in flight at once
                    request_number += 1
                    ids[s.policy] = f"demo-{request_number}"
                    s.send(xb, ids[s.policy])
                for s in streams:
                    reply_parameters = s.receive().get_response().parameters
                    if s is streams[0] and "tta_bn_shift" in reply_parameters:
                        shifts.append(reply_parameters["tta_bn_shift"].double_param)
                    reply = control.Feedback(pb.FeedbackRequest(model=args.model_name, request_id=ids[s.policy],
                                                                labels=yb.tolist()), timeout=60)
                    correct[s.policy] += reply.correct
                seen += len(yb)
                bar.set_postfix({p: round(correct[p] / seen, 3) for p in policies})  # in policy order
                bar.update(len(yb))
            bar.close()
            results[label] = {p: correct[p] / seen for p in policies}
            drift[label] = float(np.mean(shifts)) if shifts else float("nan")
            print("  " + "  ".join(f"{p} {100 * results[label][p]:5.1f}%" for p in policies)
                  + f"   (BN shift {drift[label]:.2f})", flush=True)

        header = ["phase (accuracy %)", "BN shift", *policies]
        rows = [[label, f"{drift[label]:.2f}", *[f"{100 * acc[p]:.1f}" for p in policies]]
                for label, acc in results.items()]
        rows.append(["mean", "", *[f"{100 * np.mean([acc[p] for acc in results.values()]):.1f}" for p in policies]])
        print(f"\nsummary ({time.monotonic() - started:.0f} s; online accuracy from fed-back labels, each policy on "
              f"the same images in the same order; BN shift: the label-free drift figure the server reports "
              f"(stream demo-{policies[0]})):\n")
        print(table(header, rows, rule=True))
        best = max(policies, key=lambda p: np.mean([acc[p] for acc in results.values()]))
        print(f"\nbest mean accuracy: {best}.")
        if server is None:
            print(f"inspect the streams: tta ctl --target {target} streams")
        else:
            print("to keep a server up and inspect its streams afterwards: `tta serve` in one shell, "
                  "`tta demo --target 127.0.0.1:8001` and `tta ctl streams` in another.")
    finally:
        for s in streams:
            s.close()
        if server is not None:
            server.stop()
    return 0
