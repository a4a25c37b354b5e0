"""`tta serve` in a subprocess, for the clients that start their own server (`tta demo`,
`tta bench`, the tests): `python -m runtime.server` on the given ports (0: free ones), ready when
it prints runtime.protocol.READY_LINE, stopped with SIGTERM as an operator would stop it.

A client runs the server in its own process because tritonclient and the server's protocol
stubs cannot share one (both register the `inference.*` protobuf symbols).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from runtime.protocol import READY_LINE


class ServerNotReady(RuntimeError):
    """The server exited, or did not print its ready line in time; the message has its stderr."""


class LocalServer:
    """`python -m runtime.server --port PORT --metrics-port METRICS_PORT --http-port HTTP_PORT *args`,
    ready on return (a later `--http-port` in args wins).

    host, port, metrics_port, http_port (the REST front; -1: off) and target ("host:port") are
    what the ready line says; stdout and stderr are drained by threads, so a chatty server never
    blocks on a full pipe."""

    def __init__(self, *args: str, port: int = 0, metrics_port: int = 0, http_port: int = 0,
                 env: dict[str, str] | None = None, cwd=None, timeout: float = 120.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.server", "--port", str(port), "--metrics-port", str(metrics_port),
             "--http-port", str(http_port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        self.signalled = False
        self._stderr: list[str] = []
        self._ready = None
        self._ready_seen = threading.Event()  # the ready line, or stdout closed
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.host, self.port, self.metrics_port = (self._ready.group(1), int(self._ready.group(2)),
                                                   int(self._ready.group(3)))
        self.http_port = int(self._ready.group(4)) if self._ready.group(4) is not None else -1
        self.target = f"{self.host}:{self.port}"

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            if self._ready is None and (match := READY_LINE.search(line)):
                self._ready = match
                self._ready_seen.set()
        self._ready_seen.set()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _wait_ready(self, timeout: float) -> None:
        if not self._ready_seen.wait(timeout):
            raise ServerNotReady(f"the server did not start: not ready within {timeout:g} s:\n{self.stderr()}")
        if self._ready is None:  # stdout closed before the ready line: the server is exiting
            code = self.proc.wait(timeout)
            self._stderr_thread.join(5)
            raise ServerNotReady(f"the server did not start: it exited with {code}:\n{self.stderr()}")

    def stderr(self) -> str:
        """What the server wrote to stderr so far."""
        return "".join(self._stderr)

    def sigterm(self) -> None:
        """Ask for a graceful shutdown, once (a second signal makes the server exit at once)."""
        if not self.signalled and self.proc.poll() is None:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code; a server still running after `timeout` s is killed and
        subprocess.TimeoutExpired raised."""
        self.sigterm()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
