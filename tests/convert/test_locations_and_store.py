"""Where checkpoints come from and where artifacts go: http(s) and s3 on 127.0.0.1, pvc://
roots, directory digests, and a store that is complete or absent, never half-written."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ptm_runtime.convert.errors import Unavailable
from ptm_runtime.convert.locations import digest, local_path
from ptm_runtime.convert.store import LocalStore, open_store
from ptm_runtime.report import EXIT_INVALID, EXIT_TRANSIENT, MODEL_FILE, REPORT_FILE, Report, sha256_file
from tests.convert.conftest import MLP, ConvertFn


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_source_ok_missing_and_unreachable(
    convert: ConvertFn, mlp_checkpoint: Path, http_root: tuple[str, Path], tmp_path: Path
) -> None:
    base, www = http_root
    shutil.copy(mlp_checkpoint, www / "mlp.pt")
    store = ("--store", str(tmp_path / "store"), "--name", "mlp")
    ok = convert("--source", f"{base}/mlp.pt", *MLP, "--sha256", sha256_file(mlp_checkpoint), *store)
    assert ok.code == 0, ok.stderr[-2000:]
    assert ok.report.source_uri == f"{base}/mlp.pt"

    missing = convert("--source", f"{base}/gone.pt", *MLP, *store)
    assert missing.code == EXIT_INVALID
    assert missing.failure.permanent and "HTTP 404" in missing.failure.message

    down = convert("--source", f"http://127.0.0.1:{_closed_port()}/mlp.pt", *MLP, *store)
    assert down.code == EXIT_TRANSIENT, down.stderr[-2000:]
    assert down.failure.reason == "Unavailable" and not down.failure.permanent
    assert "Connection refused" in down.failure.message


def test_s3_source_and_store_with_reuse(
    convert: ConvertFn, mlp_checkpoint: Path, s3_endpoint: Any, tmp_path: Path
) -> None:
    s3_endpoint.create_bucket(Bucket="models")
    s3_endpoint.create_bucket(Bucket="artifacts")
    s3_endpoint.upload_file(str(mlp_checkpoint), "models", "team/mlp.pt")
    args = (
        "--source", "s3://models/team/mlp.pt", *MLP, "--store", "s3://artifacts/ptm",
        "--namespace", "ns1", "--name", "mlp", "--revision", "r7",
    )  # fmt: skip
    run = convert(*args)
    assert run.code == 0, run.stderr[-2000:]
    report = run.report
    assert report.artifact_uri == "s3://artifacts/ptm/ns1/mlp/r7/model.onnx"
    body = s3_endpoint.get_object(Bucket="artifacts", Key="ptm/ns1/mlp/r7/model.onnx")["Body"].read()
    assert len(body) == report.size_bytes
    stored = Report.model_validate_json(
        s3_endpoint.get_object(Bucket="artifacts", Key="ptm/ns1/mlp/r7/report.json")["Body"].read()
    )
    assert stored.sha256 == report.sha256 and stored.candidates

    again = convert(*args)
    assert again.code == 0 and again.stdout.startswith("reused:")

    missing = convert(
        "--source", "s3://models/team/none.pt", *MLP, "--store", str(tmp_path / "s"), "--name", "x"
    )
    assert missing.code == EXIT_INVALID, missing.stderr[-2000:]
    assert "no such object" in missing.failure.message


def test_s3_unreachable_is_transient(
    convert: ConvertFn, mlp_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    run = convert("--source", "s3://models/mlp.pt", *MLP, "--store", str(tmp_path / "s"), "--name", "x")
    assert run.code == EXIT_TRANSIENT, run.stderr[-2000:]
    assert run.failure.reason == "Unavailable"


def test_pvc_source_and_store_resolve_under_the_mount_root(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    root = tmp_path / "pvc"
    (root / "ckpts" / "team").mkdir(parents=True)
    shutil.copy(mlp_checkpoint, root / "ckpts" / "team" / "mlp.pt")
    run = convert(
        "--source", "pvc://ckpts/team/mlp.pt", *MLP, "--store", "pvc://artifacts/store", "--pvc-root", str(root),
        "--name", "mlp", "--revision", "r1",
    )  # fmt: skip
    assert run.code == 0, run.stderr[-2000:]
    assert run.report.artifact_uri == "pvc://artifacts/store/default/mlp/r1/model.onnx"
    assert (root / "artifacts" / "store" / "default" / "mlp" / "r1" / MODEL_FILE).is_file()
    with pytest.raises(Exception, match="leaves the volume"):
        local_path("pvc://ckpts/../../etc/passwd", root)


def _report(artifact: Path) -> Report:
    return Report(
        artifact_uri="file:///x/model.onnx",
        sha256=sha256_file(artifact),
        size_bytes=artifact.stat().st_size,
        opset=18,
        precision="fp32",
        validation_passed=True,
    )


def test_a_crash_while_committing_leaves_nothing_at_the_final_path(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, LocalStore)
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"onnx-bytes" * 1000)
    # the second file vanishes mid-commit, as if the job were killed while copying
    files = {MODEL_FILE: artifact, "model.ort": tmp_path / "missing.ort"}
    with pytest.raises(Unavailable, match="cannot write"):
        store.commit("ns", "m", "r1", files, _report(artifact))
    parent = tmp_path / "store" / "ns" / "m"
    assert not (parent / "r1").exists()
    assert list(parent.iterdir()) == []  # no staging folder left either
    assert store.find("ns", "m", "r1") is None


def test_a_killed_job_s_staging_folder_is_ignored_and_cleaned(
    convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "store" / "default" / "mlp"
    stale = parent / ".r1.partial-deadbeef"
    stale.mkdir(parents=True)
    (stale / MODEL_FILE).write_bytes(b"half an artif")
    assert open_store(str(tmp_path / "store")).find("default", "mlp", "r1") is None
    run = convert("--source", str(mlp_checkpoint), *MLP, "--store", str(tmp_path / "store"), "--name", "mlp",
                  "--revision", "r1")  # fmt: skip
    assert run.code == 0, run.stderr[-2000:]
    assert sorted(p.name for p in parent.iterdir()) == ["r1"]
    assert sha256_file(parent / "r1" / MODEL_FILE) == run.report.sha256


def test_a_tampered_artifact_is_not_reused(convert: ConvertFn, mlp_checkpoint: Path, tmp_path: Path) -> None:
    args = ("--source", str(mlp_checkpoint), *MLP, "--store", str(tmp_path / "store"), "--name", "mlp",
            "--revision", "r1")  # fmt: skip
    assert convert(*args).code == 0
    final = tmp_path / "store" / "default" / "mlp" / "r1"
    (final / MODEL_FILE).write_bytes(b"not the model")
    again = convert(*args)
    assert again.code == 0 and again.stdout.startswith("converted:")
    assert sha256_file(final / MODEL_FILE) == json.loads((final / REPORT_FILE).read_text())["sha256"]


def test_directory_digest_matches_the_documented_shell_pipeline(tmp_path: Path) -> None:
    folder = tmp_path / "model dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    (folder / "B.txt").write_text("upper case sorts first")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "meta").write_text("ignored")
    shell = subprocess.run(
        "find . -type f -not -path './.cache/*' -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
        shell=True, cwd=folder, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert digest(folder) == shell.stdout.split()[0]


@pytest.mark.parametrize("hub", ["not-a-hub", "unreachable"])
def test_hf_source_through_the_console_script(hub: str, http_root: tuple[str, Path], tmp_path: Path) -> None:
    """The `ptm` console script in a fresh process (huggingface_hub reads its settings at import):
    a server that is not a hub is a permanent error, an unreachable one a transient error."""
    import os
    import sys

    endpoint = http_root[0] if hub == "not-a-hub" else f"http://127.0.0.1:{_closed_port()}"
    term = tmp_path / "termination.log"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ptm")), "convert", "--source", "hf://acme/tiny-model@main",
         "--format", "huggingface", "--store", str(tmp_path / "store"), "--name", "hf", "--termination-log", str(term)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    failure = json.loads(term.read_text())
    if hub == "not-a-hub":
        assert proc.returncode == EXIT_INVALID, proc.stderr[-2000:]
        assert failure["reason"] == "InvalidSource" and "HTTP 404" in failure["message"]
    else:
        assert proc.returncode == EXIT_TRANSIENT, proc.stderr[-2000:]
        assert failure["reason"] == "Unavailable" and not failure["permanent"]
    assert "hf://acme/tiny-model@main" in proc.stderr
