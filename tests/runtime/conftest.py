"""Runtime test fixtures: `ptm serve` as a real subprocess on 127.0.0.1 with free ports.

Servers run in their own process: that is how pods run them, it lets the tests send real
signals, and it keeps the server's generated protobuf module out of the test process (which
imports tritonclient's copy of the same `inference` package as a third-party client).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.runtime import models

START_TIMEOUT_S = 60.0


class ServeProcess:
    """One `ptm serve` subprocess; ports come from its --ports-file (port 0: no races)."""

    def __init__(self, model: Path, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.ports_file = workdir / f"ports-{time.monotonic_ns()}.json"
        self.log_path = self.ports_file.with_suffix(".log")
        cmd = [
            sys.executable,
            "-m",
            "ptm_runtime.serve.cli",
            str(model),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--ports-file",
            str(self.ports_file),
            "--log-level",
            "warning",
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.http = self.grpc = self.metrics = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ports_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"ptm serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ptm serve did not listen within {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        ports = json.loads(self.ports_file.read_text())
        self.http, self.grpc, self.metrics = ports["http"], ports["grpc"], ports["metrics"]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> ServeProcess:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"ptm serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ptm serve not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url, timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def start_post(self, path: str, length: int, sent: bytes) -> http.client.HTTPConnection:
        """A JSON POST of `length` bytes on a connection of its own, of which only `sent` has
        gone: the rest is the caller's to send (or not)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http, timeout=60)
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders(sent)
        return connection

    def post_together(self, path: str, model: str, bodies: list[bytes]) -> list[tuple[int, bytes]]:
        """POST every JSON body on its own connection so that all are in the server at once:
        each sends all but its last byte, and the last bytes go only when the server counts
        every request in flight. Returns (status, body) per request, in order."""
        from tests.conftest import wait_for

        before = self.metric("ptm_requests_in_flight", model=model)
        connections = [self.start_post(path, len(body), body[:-1]) for body in bodies]
        try:
            wait_for(
                lambda: self.metric("ptm_requests_in_flight", model=model) == before + len(bodies),
                START_TIMEOUT_S,
                f"{len(bodies)} requests in flight",
                interval=0.02,
            )
            for connection, body in zip(connections, bodies, strict=True):
                connection.send(body[-1:])
            answers = []
            for connection in connections:
                response = connection.getresponse()
                answers.append((response.status, response.read()))
            return answers
        finally:
            for connection in connections:
                connection.close()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"ptm serve ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        finally:
            self._log.close()


ServeFactory = Callable[..., ServeProcess]


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeFactory]:
    """Start servers for a module; every one still running is stopped (by its PID) at the end."""
    started: list[ServeProcess] = []
    workdir = tmp_path_factory.mktemp("serve")

    def start(model: Path, *args: str, ready: bool = True, **kw: Any) -> ServeProcess:
        server = ServeProcess(model, workdir, *args, **kw)
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.terminate()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def linear_model(model_dir: Path) -> Path:
    return models.linear(model_dir / "linear.onnx")


@pytest.fixture(scope="module")
def slow_model(model_dir: Path) -> Path:
    """About 0.4 s per call on one thread: wide windows for queue and drain tests on a busy machine."""
    return models.slow(model_dir / "slow.onnx", depth=40)
