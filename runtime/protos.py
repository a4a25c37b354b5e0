"""Generate the Python gRPC stubs from proto/ (never committed) and make them importable.

`make install` runs `python -m runtime.protos`; importing `load()` regenerates lazily when a
.proto file is newer than its stubs, so a fresh checkout works without the Makefile too.

The stubs live in runtime/_generated/ and are imported by their proto package names
(`inference.grpc_service_pb2`, `tta.v1.adaptation_pb2`), which is why that directory goes on
sys.path. Note: tritonclient registers the same `inference.*` symbols in protobuf's default
descriptor pool, so one process cannot import both our inference stubs and tritonclient.grpc;
clients (demo, tests) therefore run the server in a separate process.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
GENERATED = Path(__file__).resolve().parent / "_generated"


def _proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _stale() -> bool:
    stamp = GENERATED / ".stamp"
    if not stamp.exists():
        return True
    built = stamp.stat().st_mtime
    return any(p.stat().st_mtime > built for p in _proto_files())


def generate() -> None:
    from grpc_tools import protoc  # build-time tool, pinned with grpcio in pyproject

    GENERATED.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in _proto_files()]
    if not files:
        return
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={GENERATED}",
            f"--grpc_python_out={GENERATED}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    for d in [GENERATED, *[p for p in GENERATED.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    (GENERATED / ".stamp").touch()


def load(module: str):
    """Import a generated module, e.g. load("inference.grpc_service_pb2")."""
    if _stale():
        generate()
    if str(GENERATED) not in sys.path:
        sys.path.insert(0, str(GENERATED))
    return importlib.import_module(module)


if __name__ == "__main__":
    generate()
    print(f"generated stubs for {len(_proto_files())} proto files into {GENERATED}")
