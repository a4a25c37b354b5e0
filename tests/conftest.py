"""Shared fixtures for the server tests: a tiny model config and real `tta serve` subprocesses.

The server always runs in its own process: tritonclient registers the `inference.*` protobuf
symbols in protobuf's default pool, so a process that imports tritonclient.grpc cannot also
import our generated `inference` stubs (runtime.server). No test module may import
runtime.server in-process.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime.demo.launcher import LocalServer

REPO = Path(__file__).resolve().parent.parent
TINY_FACTORY = REPO / "tests" / "adapter_models.py"
TINY_LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRACKED = ["tracked-a", "tracked-b"]


def write_tiny_config(folder: Path, default_policy: str = "bn", extra_model: str = "") -> Path:
    """A model config for tests/adapter_models.py's tiny BN CNN (16×16 input, 10 classes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(f"""
name = "tiny"
[model]
factory = "{TINY_FACTORY}:tiny_cnn"
random_weights = true  # tiny_cnn's own seeded initialisation, on purpose (no weights file)
{extra_model}
[input]
size = [16, 16]
channels = 3
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[output]
labels = {TINY_LABELS!r}
[policy]
default = "{default_policy}"
[streams]
tracked = {TRACKED!r}
""".replace("'", '"'))
    return path


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tiny(tiny_config):
    """The tiny model loaded in-process (for engine tests)."""
    from runtime.model_config import load
    return load(tiny_config, device="cpu")


def run_engine(model, scenario, **engine_args):
    """Run `await scenario(engine)` on a fresh in-process engine, then stop it."""
    import asyncio

    from runtime.engine import Engine

    async def main():
        engine = Engine(model, **engine_args)
        try:
            return await scenario(engine)
        finally:
            engine.close()
    return asyncio.run(main())


class ServerProcess(LocalServer):
    """`python -m runtime.server` on free loopback ports (runtime.demo.launcher), with the tests'
    environment (one OpenMP thread, no progress bars), from the repository root; stop() sends
    SIGTERM and returns the exit code. The REST front listens on a free port too (`http_port`,
    read from the ready line; pass http_port=-1 for none)."""

    def __init__(self, *args: str, timeout: float = 60.0, port: int = 0, http_port: int = 0):
        super().__init__(*args, env={"OMP_NUM_THREADS": "1", "TTA_NO_PROGRESS": "1"}, cwd=REPO, timeout=timeout,
                         port=port, http_port=http_port)


@pytest.fixture(scope="session")
def server(tiny_config):
    """One server for the test session (tests use distinct stream ids). Messages over 1 MiB are refused."""
    proc = ServerProcess("--model", str(tiny_config), "--max-message-mb", "1")
    yield proc
    proc.stop()
