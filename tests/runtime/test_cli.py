"""`ptm serve` configuration (flags over PTM_SERVE_* env) and its import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptm_runtime.options import ExecutionProvider, GraphOptimizationLevel
from ptm_runtime.serve.cli import build_parser, settings_from_args


def _settings(argv: list[str]):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(argv))


def test_defaults_and_flags(tmp_path: Path) -> None:
    s = _settings([str(tmp_path)])
    assert (s.host, s.http_port, s.grpc_port, s.metrics_port, s.model_name) == (
        "127.0.0.1",
        8080,
        8081,
        8082,
        "model",
    )
    assert s.options.batching.max_batch_size == 8
    s = _settings(
        [
            str(tmp_path),
            "--host",
            "0.0.0.0",
            "--model-name",
            "resnet",
            "--max-batch-size",
            "16",
            "--execution-providers",
            "CUDAExecutionProvider,CPUExecutionProvider",
            "--graph-optimization-level",
            "basic",
            "--thread-spinning",
            "--concurrent-runs",
            "2",
            "--preferred-batch-size",
            "4",
        ]
    )
    assert s.host == "0.0.0.0" and s.model_name == "resnet"
    assert s.options.batching.max_batch_size == 16 and s.options.batching.preferred_batch_size == 4
    assert s.options.execution_providers == [ExecutionProvider.CUDA, ExecutionProvider.CPU]
    assert s.options.graph_optimization_level is GraphOptimizationLevel.BASIC
    assert s.options.thread_spinning is True and s.options.concurrent_runs == 2
    assert _settings([str(tmp_path)]).options.thread_spinning is False


def test_env_then_options_json_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTM_SERVE_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("PTM_SERVE_HTTP_PORT", "9000")
    monkeypatch.setenv("PTM_SERVE_OPTIONS", json.dumps({"batching": {"maxBatchSize": 4, "maxQueueSize": 10}}))
    s = _settings([])
    assert s.model_path == tmp_path and s.http_port == 9000
    assert (s.options.batching.max_batch_size, s.options.batching.max_queue_size) == (4, 10)
    s = _settings(
        ["--http-port", "9100", "--max-queue-size", "20"]
    )  # a flag tweaks env options field by field
    assert s.http_port == 9100
    assert (s.options.batching.max_batch_size, s.options.batching.max_queue_size) == (4, 20)
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"warmupRequests": 0, "batching": {"maxQueueDelayMs": 0}}))
    s = _settings(["--options-json", f"@{options}", "--max-batch-size", "2"])
    assert s.options.warmup_requests == 0 and s.options.batching.max_queue_delay_ms == 0
    assert s.options.batching.max_batch_size == 2 and s.options.batching.max_queue_size == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "greater than or equal to 1"),
        (["--options-json", '{"batching": {"maxBatchSize": 8, "bogus": 1}}'], "bogus"),
        (["--execution-providers", "FancyExecutionProvider"], "executionProviders"),
        (["--model-name", "a/b"], "model_name"),
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings([str(tmp_path), *argv])


def test_serve_path_imports_neither_torch_nor_kopf() -> None:
    code = (
        "import sys\n"
        "import ptm_operator.cli, ptm_runtime.serve.cli, ptm_runtime.serve.server, ptm_runtime.serve.grpc\n"
        "assert ptm_operator.cli.COMMANDS['serve']\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'kopf', 'kubernetes', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_ptm_serve_help_through_the_ptm_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ptm_operator.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "Open Inference Protocol" in out.stdout


def test_port_in_use_exits_1_with_the_reason(tmp_path: Path) -> None:
    import socket

    from tests.runtime import models

    model = models.linear(tmp_path / "linear.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "ptm_runtime.serve.cli", str(model), "--http-port", str(port), "--grpc-port", "0",
             "--metrics-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1
    assert "cannot listen on 127.0.0.1" in out.stderr and "Address already in use" in out.stderr
