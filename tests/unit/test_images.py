"""Image building without Docker: cache keys, the requirement lists, the pause layer, OCI archives."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from ptm_operator.devcluster import ClusterError, images, oci


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write(root / "pyproject.toml", '[project]\nname = "ptm"\nversion = "0.1.0"\n')
    write(root / "operator/ptm_operator/__init__.py", "")
    write(root / "operator/ptm_operator/cli.py", "def main() -> int:\n    return 0\n")
    write(root / "runtime_image/ptm_runtime/__init__.py", "")
    write(root / "runtime_image/ptm_runtime/serve/proto/inference.proto", 'syntax = "proto3";\n')
    return root


def test_app_files_leave_out_bytecode(tree: Path) -> None:
    write(tree / "operator/ptm_operator/__pycache__/cli.cpython-311.pyc", "bytecode")
    assert [p.as_posix() for p in images.app_files(tree)] == [
        "operator/ptm_operator/__init__.py",
        "operator/ptm_operator/cli.py",
        "runtime_image/ptm_runtime/__init__.py",
        "runtime_image/ptm_runtime/serve/proto/inference.proto",
    ]


def test_app_key_is_stable_and_follows_the_sources(tree: Path) -> None:
    key = images.app_key(tree)
    assert images.app_key(tree) == key
    write(tree / "runtime_image/ptm_runtime/__pycache__/x.cpython-311.pyc", "bytecode")
    assert images.app_key(tree) == key, "bytecode is not part of the image"

    write(tree / "operator/ptm_operator/cli.py", "def main() -> int:\n    return 1\n")
    edited = images.app_key(tree)
    assert edited != key
    (tree / "operator/ptm_operator/cli.py").rename(tree / "operator/ptm_operator/cli2.py")
    assert images.app_key(tree) not in {key, edited}, "a rename is a change"
    write(tree / "pyproject.toml", '[project]\nname = "ptm"\nversion = "0.2.0"\n')
    assert images.app_key(tree) not in {key, edited}


def test_requirements_come_from_pyproject() -> None:
    pyproject = images.load_pyproject()
    project = pyproject["project"]
    for extra in ("convert", "serve"):
        reqs = images.requirements(pyproject, extra)
        assert reqs == [*project["dependencies"], *project["optional-dependencies"][extra]]
        assert not any(r.startswith("ptm") for r in reqs), "the project itself is the app layer"
    assert any(r.startswith("torch>=") for r in images.requirements(pyproject, "convert"))
    assert not any(r.startswith("torch") for r in images.requirements(pyproject, "serve"))


def test_requirements_drop_duplicates() -> None:
    pyproject = {"project": {"dependencies": ["numpy"], "optional-dependencies": {"x": ["numpy", "a"]}}}
    assert images.requirements(pyproject, "x") == ["numpy", "a"]


def test_deps_key_follows_the_requirements_only() -> None:
    pyproject: dict[str, Any] = {
        "project": {
            "dependencies": ["numpy"],
            "optional-dependencies": {"serve": ["onnxruntime"], "convert": ["torch"], "dev": ["pytest"]},
        }
    }
    serve = images.deps_layer("serve", pyproject).key
    assert images.deps_layer("convert", pyproject).key != serve
    pyproject["project"]["optional-dependencies"]["dev"].append("ruff")
    assert images.deps_layer("serve", pyproject).key == serve, "a dev tool does not rebuild the image"
    pyproject["project"]["optional-dependencies"]["serve"].append("orjson")
    assert images.deps_layer("serve", pyproject).key != serve


def test_image_names_follow_layers_and_config() -> None:
    config = images.CONFIGS["serve"]
    key = images.image_key("serve", ["a", "b"], config)
    assert images.image_key("serve", ["a", "b"], config) == key
    assert images.image_key("serve", ["a", "c"], config) != key
    assert images.image_key("serve", ["a", "b"], images.CONFIGS["convert"]) != key


def test_image_configs_match_the_dockerfile() -> None:
    serve = images.CONFIGS["serve"].document([])["config"]
    assert serve["Entrypoint"] == ["ptm", "serve"]
    assert serve["User"] == "10001:10001"
    assert serve["WorkingDir"] == "/home/ptm"
    assert "PTM_SERVE_HOST=0.0.0.0" in serve["Env"]
    assert serve["Env"][0].startswith("PATH=/opt/ptm/bin:")
    assert set(serve["ExposedPorts"]) == {"8080/tcp", "8081/tcp", "8082/tcp"}
    convert = images.CONFIGS["convert"].document([])["config"]
    assert convert["Entrypoint"] == ["ptm", "convert"]
    assert "ExposedPorts" not in convert
    assert not any(e.startswith("PTM_SERVE_HOST=") for e in convert["Env"])


def test_pause_layer_holds_only_pause(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF fake")
    layer = tmp_path / "layer.tar"
    images.write_pause_layer(binary, layer)
    with tarfile.open(layer) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mode, member.uid, member.gid) == ("pause", 0o755, 0, 0)
        assert member.isfile()
        f = tar.extractfile(member)
        assert f is not None and f.read() == b"\x7fELF fake"
    before = layer.read_bytes()
    images.write_pause_layer(binary, layer)
    assert layer.read_bytes() == before, "reproducible: same binary, same digest"


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_pause_exits_0_on_sigterm(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    images.run("compile pause", [*images.PAUSE_CC, "-o", binary, images.PAUSE_SOURCE])
    proc = subprocess.Popen([binary])
    deadline = time.monotonic() + 10
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None, f"pause exited with {proc.returncode} before it handled SIGTERM"
        assert time.monotonic() < deadline, "pause did not install its SIGTERM handler within 10 s"
        time.sleep(0.01)
    assert proc.poll() is None, "pause sleeps"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0


def test_run_names_the_step_and_the_output_tail() -> None:
    with pytest.raises(ClusterError, match=r"(?s)the step failed \(exit 3\).*last words"):
        images.run("the step", ["sh", "-c", "echo last words; exit 3"])
    with pytest.raises(ClusterError, match="the step: cannot run"):
        images.run("the step", ["/nonexistent/binary"])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tiny_layer(path: Path, name: str, content: bytes) -> Path:
    src = write(path.parent / f"{path.stem}-src" / name, content.decode())
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname=name)
    return path


def test_write_archive_digests_are_consistent(tmp_path: Path) -> None:
    a = tiny_layer(tmp_path / "a.tar", "a", b"first")
    b = tiny_layer(tmp_path / "b.tar", "b", b"second")
    archive = tmp_path / "image.oci.tar"
    config = oci.ImageConfig(entrypoint=["/a"], user="1:1", exposed_ports=[8080])
    manifest_digest = oci.write_archive(archive, "ptm-x:abc", [a, b, a], config)

    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    blobs = {
        name.removeprefix("blobs/sha256/"): data for name, data in files.items() if name.startswith("blobs/")
    }
    assert all(sha256(data) == f"sha256:{name}" for name, data in blobs.items()), (
        "blobs are content-addressed"
    )
    assert len(blobs) == 4, "config, manifest and two distinct layers: a repeated layer is stored once"

    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["digest"] == manifest_digest
    assert entry["annotations"][oci.CONTAINERD_NAME] == "docker.io/library/ptm-x:abc"
    manifest_blob = blobs[manifest_digest[7:]]
    assert entry["size"] == len(manifest_blob)
    manifest = json.loads(manifest_blob)
    layer_digests = [oci.sha256_file(p) for p in (a, b, a)]
    assert [layer["digest"] for layer in manifest["layers"]] == layer_digests
    assert [layer["size"] for layer in manifest["layers"]] == [p.stat().st_size for p in (a, b, a)]
    config_blob = blobs[manifest["config"]["digest"][7:]]
    assert manifest["config"]["size"] == len(config_blob)
    document = json.loads(config_blob)
    assert document["rootfs"]["diff_ids"] == layer_digests, "uncompressed: diff_id == blob digest"
    assert document["config"]["ExposedPorts"] == {"8080/tcp": {}}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("ptm-serve:abc", "docker.io/library/ptm-serve:abc"),
        ("me/ptm:1", "docker.io/me/ptm:1"),
        ("localhost/ptm:1", "localhost/ptm:1"),
        ("registry.example:5000/ptm:1", "registry.example:5000/ptm:1"),
    ],
)
def test_qualified(name: str, full: str) -> None:
    assert oci.qualified(name) == full


def test_build_pause_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTM_CACHE", str(tmp_path))
    logged: list[str] = []
    [first] = images.build(["pause"], log=logged.append).values()
    assert first.name.startswith("ptm-pause:") and all(p.is_file() for p in first.layers)
    assert {p.parent for p in first.layers} == {tmp_path / "images" / "layers"}
    mtimes = [p.stat().st_mtime_ns for p in first.layers]
    assert logged

    logged.clear()
    [again] = images.build(["pause"], log=logged.append).values()
    assert again == first and [p.stat().st_mtime_ns for p in again.layers] == mtimes
    assert logged == [], "nothing rebuilt"
    assert not list((tmp_path / "images").rglob("*.tmp")) and not (tmp_path / "images/tmp").exists()


def test_build_prunes_what_an_older_tree_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTM_CACHE", str(tmp_path))
    cache = tmp_path / "images"
    stale = [write(cache / "serve-000000000000.oci.tar", ""), write(cache / "layers/pause-0000.tar", "")]
    others = [write(cache / "layers/deps-serve-0000.tar", ""), write(cache / "layers/pause-gpu-0000.tar", "")]
    [image] = images.build(["pause"]).values()
    assert all(p.is_file() for p in image.layers)
    digest = image.write_archive(tmp_path / "pause.oci.tar")
    with tarfile.open(tmp_path / "pause.oci.tar") as tar:
        assert f"blobs/sha256/{digest[7:]}" in tar.getnames()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others), "other targets' files are theirs to prune"


def test_unknown_target() -> None:
    with pytest.raises(ClusterError, match="unknown image target"):
        images.build(["nope"])
