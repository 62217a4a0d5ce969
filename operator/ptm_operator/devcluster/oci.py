"""Write OCI image archives without a Docker engine.

An image is a config (JSON: environment, entrypoint, user, the layers' uncompressed digests) and
layers (tar files of a filesystem). An OCI image layout archive holds them as content-addressed
blobs plus `index.json`, which `ctr images import` loads into containerd; the
`io.containerd.image.name` annotation names the image there.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
CONTAINERD_NAME = "io.containerd.image.name"


def qualified(name: str) -> str:
    """`ptm-serve:abc` -> `docker.io/library/ptm-serve:abc`, the name the CRI resolves it to."""
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class ImageConfig:
    """The parts of an OCI image config a pod's container uses."""

    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = ""
    cmd: list[str] = field(default_factory=list)
    exposed_ports: list[int] = field(default_factory=list)

    def document(self, diff_ids: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Entrypoint": self.entrypoint,
            "Env": [f"{k}={v}" for k, v in self.env.items()],
        }
        if self.cmd:
            config["Cmd"] = self.cmd
        if self.user:
            config["User"] = self.user
        if self.working_dir:
            config["WorkingDir"] = self.working_dir
        if self.exposed_ports:
            config["ExposedPorts"] = {f"{p}/tcp": {} for p in self.exposed_ports}
        return {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }


def write_archive(path: Path, name: str, layers: list[Path], config: ImageConfig) -> str:
    """Write an OCI layout tar at `path` (atomically) for image `name`; returns the manifest digest.

    Layers are uncompressed tars, so a layer's blob digest is also its diff_id; containerd stores
    each blob once, so layers shared between images (the base) are imported once.
    """
    digests = [sha256_file(layer) for layer in layers]
    config_blob = json.dumps(config.document(digests), sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_blob).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_blob)},
        "layers": [
            {"mediaType": MEDIA_LAYER, "digest": d, "size": layer.stat().st_size}
            for d, layer in zip(digests, layers, strict=True)
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_blob).hexdigest()
    full = qualified(name)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_blob),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {CONTAINERD_NAME: full, "org.opencontainers.image.ref.name": full},
            }
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

        def add_bytes(arcname: str, data: bytes) -> None:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add_bytes("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add_bytes("index.json", json.dumps(index, sort_keys=True).encode())
        add_bytes(f"blobs/sha256/{config_digest[7:]}", config_blob)
        add_bytes(f"blobs/sha256/{manifest_digest[7:]}", manifest_blob)
        seen: set[str] = set()
        for digest, layer in zip(digests, layers, strict=True):
            if digest not in seen:
                seen.add(digest)
                tar.add(str(layer), arcname=f"blobs/sha256/{digest[7:]}")
    tmp.replace(path)
    return manifest_digest
