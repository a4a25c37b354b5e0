"""What several replicas cost, measured: `python -m runtime.lab.bench_replicas` starts a
one-member etcd (Debian's etcd-server) and two `tta serve --coordinator` replicas of the demo
model on loopback, sharing a temporary state dir, plus one replica without a coordinator, and
prints side by side:

- the first request of a new stream with and without a coordinator (taking its etcd key);
- the next requests of a held stream with and without (the hold is checked locally);
- hand-offs: each stream's requests sent alternately to the two replicas, so every request is a
  hand-off (the holder applies its owed update, commits a checkpoint, releases; the other takes
  the key and loads): hand-offs per second and their latency.

Requests run one after another on one client (the figures are per request, not a throughput).
Streams per replica are bounded by --memory-budget-mb as without replicas (an etcd key per
held stream costs etcd about 100 bytes): see `tta bench --sections memory`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime.demo.launcher import LocalServer
from runtime.lab.timing import percentile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    """A one-member etcd on loopback with its data in `folder`; stop() then start() is an outage."""

    def __init__(self, folder: Path, exe: str | None = None):
        self.exe = exe or shutil.which("etcd")
        if self.exe is None:
            raise FileNotFoundError("etcd not found: install Debian's etcd-server (apt-get install etcd-server)")
        self.folder, self.client, self.peer = Path(folder), free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{self.client}"
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        from runtime.coordination.etcd import Etcd, EtcdUnavailable

        peer = f"http://127.0.0.1:{self.peer}"
        self.log = open(self.folder / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--name", "t", "--data-dir", str(self.folder / "data"),
             "--listen-client-urls", f"http://127.0.0.1:{self.client}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.client}", "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        client, deadline = Etcd([f"127.0.0.1:{self.client}"], timeout=1.0), time.monotonic() + timeout
        try:
            while True:
                try:
                    client.get(b"/ready")
                    return
                except EtcdUnavailable:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("etcd did not start: "
                                           + (self.folder / "etcd.log").read_text()[-2000:]) from None
                    time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _timed(endpoint, x, stream: str) -> float:
    started = time.perf_counter()
    endpoint.infer(x, stream)
    return time.perf_counter() - started


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3}


def bench_replicas(streams: int = 40, rounds: int = 3, policy: str = "tent") -> dict:
    from runtime.lab.bench_grpc import Endpoint

    folder = Path(tempfile.mkdtemp(prefix="tta-bench-replicas-"))
    etcd = EtcdProcess(folder)
    servers = []
    try:
        ports = [free_port(), free_port()]
        common = ["--state-dir", str(folder / "state"), "--policy", policy, "--guard", "off"]
        for i, port in enumerate(ports):
            servers.append(LocalServer(*common, "--coordinator", etcd.url, "--replica-id", f"r{i}",
                                       "--advertise", f"127.0.0.1:{port}", port=port))
        servers.append(LocalServer("--state-dir", str(folder / "alone"), "--policy", policy, "--guard", "off"))
        a, b, alone = (Endpoint(s.target) for s in servers)
        x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
        first = {"replica": [], "alone": []}
        held = {"replica": [], "alone": []}
        for i in range(streams):  # interleaved, so both sides see the same machine
            first["replica"].append(_timed(a, x, f"new-{i}"))
            first["alone"].append(_timed(alone, x, f"new-{i}"))
            for _ in range(rounds):
                held["replica"].append(_timed(a, x, f"new-{i}"))
                held["alone"].append(_timed(alone, x, f"new-{i}"))
        handoffs = []
        started = time.perf_counter()
        for r in range(rounds):
            for i in range(streams):
                handoffs.append(_timed(b if r % 2 == 0 else a, x, f"new-{i}"))
        elapsed = time.perf_counter() - started
        out = {"streams": streams, "policy": policy,
               "first_request": {k: _summary(v) for k, v in first.items()},
               "held_request": {k: _summary(v) for k, v in held.items()},
               "handoff_request": _summary(handoffs), "handoffs_per_s": len(handoffs) / elapsed}
        out["first_over_alone"] = out["first_request"]["replica"]["p50_ms"] / out["first_request"]["alone"]["p50_ms"]
        out["held_over_alone"] = out["held_request"]["replica"]["p50_ms"] / out["held_request"]["alone"]["p50_ms"]
        out["handoff_over_held"] = out["handoff_request"]["p50_ms"] / out["held_request"]["replica"]["p50_ms"]
        return out
    finally:
        for s in servers:
            s.stop()
        etcd.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.lab.bench_replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--policy", default="tent")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = bench_replicas(args.streams, args.rounds, args.policy)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['streams']} streams, policy {r['policy']}, one request at a time, demo model, batch 8")
    for key in ("first_request", "held_request"):
        rep, alone = r[key]["replica"], r[key]["alone"]
        print(f"  {key.replace('_', ' ')}: p50 {rep['p50_ms']:.1f} ms with a coordinator, {alone['p50_ms']:.1f} ms "
              f"without ({rep['p50_ms'] / alone['p50_ms']:.2f}x); p99 {rep['p99_ms']:.1f} / {alone['p99_ms']:.1f} ms")
    h = r["handoff_request"]
    print(f"  hand-off request: p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms "
          f"({r['handoff_over_held']:.2f}x a held stream's); {r['handoffs_per_s']:.1f} hand-offs/s on one client")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
