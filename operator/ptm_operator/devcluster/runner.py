"""`ptm operator` as a child process of the demo, the tests and the benchmarks.

One namespace, standalone (no peering), metrics on a free 127.0.0.1 port, the kopf liveness
endpoint off; callers add the settings their story needs (images, store, requeue times).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalOperator:
    """Start, kill (SIGKILL) and stop (SIGTERM, then SIGKILL) one operator process."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        *,
        new_session: bool = False,
    ) -> None:
        self.namespace = namespace
        self.log = log
        self.metrics_port = free_port()
        self.new_session = new_session
        """True for an operator that outlives its starter (the demo's)."""
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PTM_BIND_ADDRESS": "127.0.0.1",
            "PTM_METRICS_PORT": str(self.metrics_port),
            "PTM_LIVENESS_PORT": "0",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ptm_operator.cli", "operator", "--standalone", "-n", self.namespace],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.new_session,
            )
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
