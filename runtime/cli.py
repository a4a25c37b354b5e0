"""`tta` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used so
that `tta --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "serve": ("runtime.server", "run the gRPC inference server (built-in demo model without --model)"),
    "demo": ("runtime.demo.demo", "stream drifting demo data through a server and show live accuracy per policy"),
    "ctl": ("runtime.ctl", "control a running server: policies, streams, reset, snapshot, rollback, feedback"),
    "replay": ("runtime.lab.replay", "replay a corruption benchmark through adapters in-process (paper-style table)"),
    "train-demo": ("runtime.demo.train", "train the built-in demo model on Fashion-MNIST"),
    "bench": ("runtime.lab.bench", "benchmarks, as ratios measured side by side: gRPC vs in-process, reply latency per "
              "policy, adapter step vs frozen forward, CoTTA vs serial, memory per stream, ONNX vs torch, load"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tta", description="tta-runtime: test-time adaptation inference server")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sp = argparse.ArgumentParser(prog=f"tta {name}", description=COMMANDS[name][1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=getattr(module, "EXAMPLES", None))
    module.add_arguments(sp)
    args = sp.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
