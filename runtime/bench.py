"""`tta bench`: speed, measured side by side in one run.

1. adapters vs the frozen forward pass, in-process: ms per batch of each policy's step
   (predict + learn) and its ratio to the frozen source model's forward on the same batches;
2. gRPC vs in-process: a real `tta serve` subprocess on loopback driven by tritonclient
   (unary ModelInfer and streaming ModelStreamInfer), against the same adapter in-process.

Ratios are the result; absolute times depend on the machine, which is printed with them.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

import adapters

EXAMPLES = """examples:
  tta bench --quick                    # a fast pass (CI-sized)
  tta bench --batch-size 64 --json     # machine-readable
  tta bench --adapters source,bn,cotta --no-grpc
"""


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="fewer batches and a smaller adapter set")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="timed batches per measurement (default 20; 5 with --quick)")
    p.add_argument("--adapters", default=None, help="comma-separated policies (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the server (default: torch's; on a busy machine 1 avoids "
                        "thread oversubscription)")
    p.add_argument("--no-grpc", action="store_true", help="skip the gRPC vs in-process comparison")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, x, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - start


def paired_times(fn_a, fn_b, batches, device, warmup: int = 2) -> tuple[list[float], list[float]]:
    """Seconds per call of fn_a and fn_b, alternating on the same batches, so that both see the
    same machine load (the ratio is what is reported)."""
    for x in batches[:warmup]:
        fn_a(x), fn_b(x)
    a, b = [], []
    for x in batches[warmup:]:
        a.append(time_call(fn_a, x, device))
        b.append(time_call(fn_b, x, device))
    return a, b


def demo_inputs(n: int, batch_size: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(batch_size, 3, 32, 32, generator=g).to(device) for _ in range(n)]


def load_model(device):
    from runtime.demo_model import build_demo_model

    try:
        model = build_demo_model(pretrained=True)
    except FileNotFoundError:
        model = build_demo_model(pretrained=False)
    return model.to(device).eval()


def bench_adapters(model, names, batches, device, prototypes=None) -> list[dict]:
    def frozen(x):
        with torch.no_grad():
            return model(x)

    rows = []
    for name in names:
        hp = {"prototypes": prototypes} if name == "mean-teacher" and prototypes is not None else {}
        a = adapters.create(name, model, **hp)
        t_frozen, t_adapter = paired_times(frozen, a.step, batches, device)
        f, t = statistics.median(t_frozen), statistics.median(t_adapter)
        rows.append({"policy": name, "ms_per_batch": t * 1e3, "frozen_ms_per_batch": f * 1e3, "ratio": t / f})
    return rows


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server subprocess
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.batches or (5 if args.quick else 20)
    names = args.adapters.split(",") if args.adapters else (
        ["source", "bn", "unmix-tns", "tent", "cotta"] if args.quick else adapters.available())
    model = load_model(device)
    prototypes = None
    try:
        from runtime.demo_model import load_prototypes
        prototypes = load_prototypes()
    except (FileNotFoundError, OSError):
        pass
    batches = demo_inputs(n + 2, args.batch_size, device)
    result = {"machine": machine(), "device": str(device), "batch_size": args.batch_size, "timed_batches": n,
              "adapters_vs_frozen": bench_adapters(model, names, batches, device, prototypes)}
    if not args.no_grpc:
        from runtime.bench_grpc import bench_grpc

        result["grpc_vs_inprocess"] = bench_grpc(model, batches, device, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, device {device}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f"; batch {args.batch_size}, {n} timed batches (median)")
    print(f"\n{'policy (step)':16s} {'ms/batch':>10s} {'frozen ms':>10s} {'× frozen':>9s}")
    for r in result["adapters_vs_frozen"]:
        print(f"{r['policy']:16s} {r['ms_per_batch']:10.2f} {r['frozen_ms_per_batch']:10.2f} {r['ratio']:9.2f}")
    if "grpc_vs_inprocess" in result:
        print(f"\n{'path':34s} {'ms/batch':>10s} {'× in-process':>13s}")
        for r in result["grpc_vs_inprocess"]:
            print(f"{r['path']:34s} {r['ms_per_batch']:10.2f} {r['ratio']:13.2f}")
    return 0
