"""Shared fixtures for the server tests: a tiny model config and real `tta serve` subprocesses.

The server always runs in its own process: tritonclient registers the `inference.*` protobuf
symbols in protobuf's default pool, so a process that imports tritonclient.grpc cannot also
import our generated `inference` stubs (runtime.server). No test module may import
runtime.server in-process.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_FACTORY = REPO / "tests" / "adapter_models.py"
TINY_LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRACKED = ["tracked-a", "tracked-b"]
READY_LINE = re.compile(r"ready on (\S+):(\d+) metrics (-?\d+)")


def write_tiny_config(folder: Path, default_policy: str = "bn", extra_model: str = "") -> Path:
    """A model config for tests/adapter_models.py's tiny BN CNN (16×16 input, 10 classes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(f"""
name = "tiny"
[model]
factory = "{TINY_FACTORY}:tiny_cnn"
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


class ServerProcess:
    """`python -m runtime.server` on a free loopback port; stop() sends SIGTERM."""

    def __init__(self, *args: str, timeout: float = 60.0):
        env = dict(os.environ, OMP_NUM_THREADS="1", TTA_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.server", "--port", "0", "--metrics-port", "0",
                                      *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stderr_lines: list[str] = []
        self.signalled = False
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.host, self.port, self.metrics_port = self._wait_ready(timeout)
        self.target = f"{self.host}:{self.port}"

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
                continue
            match = READY_LINE.search(line)
            if match:
                return match.group(1), int(match.group(2)), int(match.group(3))
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def sigterm(self) -> None:
        """Ask for a graceful shutdown, once (a second signal makes the server exit at once)."""
        if not self.signalled and self.proc.poll() is None:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        self.sigterm()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="session")
def server(tiny_config):
    """One server for the test session (tests use distinct stream ids). Messages over 1 MiB are refused."""
    proc = ServerProcess("--model", str(tiny_config), "--max-message-mb", "1")
    yield proc
    proc.stop()
