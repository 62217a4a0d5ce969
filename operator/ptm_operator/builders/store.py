"""The artifact store as pods see it: one volume, one mount path, content-addressed paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ptm_operator.settings import Settings

STORE_VOLUME = "ptm-store"


@dataclass(frozen=True)
class Store:
    """Where the store is (volume source) and the prefix inside it."""

    volume: dict[str, Any]
    prefix: str
    mount_path: str

    def root(self) -> str:
        """The store root inside a pod (what `ptm convert --store` gets)."""
        return f"{self.mount_path}/{self.prefix}".rstrip("/")

    def artifact_dir(self, namespace: str, name: str, revision: str) -> str:
        """<store>/<namespace>/<name>/<revision>, the layout ptm_runtime.report documents."""
        return f"{self.root()}/{namespace}/{name}/{revision}"

    def mount(self, read_only: bool) -> dict[str, Any]:
        return {"name": STORE_VOLUME, "mountPath": self.mount_path, "readOnly": read_only}


def store_from_settings(settings: Settings) -> Store:
    """pvc://CLAIM[/PREFIX] -> a PersistentVolumeClaim volume; file:///PATH -> a hostPath volume."""
    url = urlparse(settings.store_uri)
    if url.scheme == "pvc":
        volume = {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": url.netloc}}
        prefix = url.path.strip("/")
    elif url.scheme == "file":
        volume = {"name": STORE_VOLUME, "hostPath": {"path": url.path, "type": "DirectoryOrCreate"}}
        prefix = ""
    else:
        raise ValueError(
            f"PTM_STORE_URI must be pvc://CLAIM[/PREFIX] or file:///PATH, got {settings.store_uri!r}"
        )
    return Store(volume=volume, prefix=prefix, mount_path=settings.store_mount_path.rstrip("/"))
