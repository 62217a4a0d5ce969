"""Where checkpoints and data sets come from: local paths, mounted PVCs, http(s), s3 and hf://.

Every location resolves to a local file or directory (downloads go into the job's work dir)
plus the sha256 of what was read, so a pinned digest can be checked before anything is
deserialized. Failures are sorted into permanent (`InvalidSource`: missing object, access
denied, bad URI) and transient (`Unavailable`: connection refused, timeouts, 5xx, throttling)
so the operator retries only what may heal.

Digest of a directory: the sha256 of its `sha256sum`-style listing, one line
`<hex digest>  <relative/path>\\n` per regular file sorted by path (bytewise), the
`.cache/` folder that huggingface_hub writes excluded. The shell equivalent:
`(cd DIR && find . -type f -not -path './.cache/*' -printf '%P\\n' | LC_ALL=C sort |
xargs -d '\\n' sha256sum) | sha256sum`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptm_runtime.convert.errors import InvalidSource, InvalidSpec, Unavailable
from ptm_runtime.report import sha256_file

log = logging.getLogger(__name__)

#: Where conversion pods mount the claim of pvc://CLAIM/PATH: <root>/<CLAIM>/PATH.
PVC_MOUNT_ROOT = "/mnt/pvc"
DEFAULT_PVC_ROOT = Path(os.environ.get("PTM_PVC_ROOT", PVC_MOUNT_ROOT))
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
HTTP_TIMEOUT_S = 60.0
#: HTTP statuses after which a retry may succeed.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Fetched:
    """A location made local."""

    path: Path
    """The file or directory (an archive already extracted when a directory was wanted)."""
    sha256: str
    """Digest of what was read (the archive's bytes for an archive)."""


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0] in {"http", "https", "s3", "hf"} if "://" in uri else False


def to_uri(location: str) -> str:
    """A command-line location as a URI: plain paths become file:// URIs."""
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri()


def local_path(uri: str, pvc_root: Path = DEFAULT_PVC_ROOT) -> Path | None:
    """The local path behind a file:// or pvc:// URI (or a plain path); None for remote URIs."""
    if "://" not in uri:
        return Path(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not claim:
            raise InvalidSpec(f"{uri}: pvc:// URIs look like pvc://CLAIM/PATH")
        root = (pvc_root / claim).resolve()
        path = (root / sub).resolve()
        if path != root and root not in path.parents:
            raise InvalidSpec(f"{uri}: the path leaves the volume")
        return path
    return None


def digest(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted listing of file digests (module docstring)."""
    if path.is_file():
        return sha256_file(path)
    lines = []
    for file in sorted(
        (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix().encode()
    ):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".cache/"):
            continue
        lines.append(f"{sha256_file(file)}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def fetch(uri: str, workdir: Path, *, want_dir: bool = False, pvc_root: Path = DEFAULT_PVC_ROOT) -> Fetched:
    """Make `uri` local. Remote objects are downloaded under `workdir`; a single archive
    (.tar, .tar.gz, .tgz, .zip) is extracted when `want_dir` (directory formats)."""
    local = local_path(uri, pvc_root)
    if local is not None:
        if not local.exists():
            raise InvalidSource(f"{uri}: no such file or directory ({local})")
        path = local
    else:
        scheme = uri.split("://", 1)[0]
        target = workdir / "download"
        target.mkdir(parents=True, exist_ok=True)
        if scheme in {"http", "https"}:
            path = _fetch_http(uri, target)
        elif scheme == "s3":
            path = _fetch_s3(uri, target)
        elif scheme == "hf":
            path = _fetch_hf(uri, target)
        else:
            raise InvalidSpec(f"{uri}: unsupported scheme {scheme}:// (file, pvc, http, https, s3, hf)")
    sha = digest(path)
    if want_dir and path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        path = extract(path, workdir / "extracted")
    return Fetched(path=path, sha256=sha)


def check_pin(uri: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise InvalidSource(f"{uri}: sha256 mismatch: the source has {actual}, the spec pins {expected}")


def extract(archive: Path, dest: Path) -> Path:
    """Extract an archive refusing members that would land outside `dest`; returns the
    single top-level folder when there is exactly one, else `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                root = dest.resolve()
                for name in zf.namelist():
                    target = (dest / name).resolve()
                    if target != root and root not in target.parents:
                        raise InvalidSource(
                            f"{archive.name}: member {name!r} would extract outside the folder"
                        )
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InvalidSource(f"{archive.name}: cannot extract the archive: {exc}") from exc
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


# --- http(s) ---------------------------------------------------------------------------------------


def _fetch_http(uri: str, target: Path) -> Path:
    name = Path(urllib.parse.urlparse(uri).path).name or "download"
    path = target / name
    request = urllib.request.Request(uri, headers={"User-Agent": "ptm-convert"})
    token = os.environ.get("PTM_HTTP_BEARER_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response, path.open("wb") as out:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as exc:
        if exc.code in TRANSIENT_HTTP:
            raise Unavailable(f"{uri}: HTTP {exc.code} {exc.reason} (retrying may help)") from exc
        raise InvalidSource(f"{uri}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"{uri}: cannot download: {reason}") from exc
    if expected is not None and path.stat().st_size != int(expected):
        raise Unavailable(f"{uri}: download truncated ({path.stat().st_size} of {expected} bytes)")
    return path


# --- s3 --------------------------------------------------------------------------------------------


def s3_client() -> Any:
    """A boto3 S3 client. Endpoint: AWS_ENDPOINT_URL(_S3) as boto3 reads it, or S3_ENDPOINT
    (KServe's convention, with S3_USE_HTTPS=0 for plain http); credentials from the usual
    AWS_* variables or files."""
    try:
        import boto3

        config_cls = importlib.import_module("botocore.config").Config
    except ImportError as exc:  # pragma: no cover - boto3 ships in the convert extra
        raise InvalidSpec("s3:// locations need boto3 (pip install 'ptm[convert]')") from exc
    endpoint = os.environ.get("S3_ENDPOINT")
    if endpoint and "://" not in endpoint:
        https = os.environ.get("S3_USE_HTTPS", "1") not in {"0", "false", "False"}
        endpoint = f"{'https' if https else 'http'}://{endpoint}"
    config = config_cls(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidSpec(f"{uri}: s3 URIs look like s3://BUCKET/KEY")
    return parsed.netloc, parsed.path.lstrip("/")


def botocore_errors() -> Any:
    """botocore.exceptions (untyped; imported only where s3 is used)."""
    return importlib.import_module("botocore.exceptions")


def s3_error(uri: str, exc: Exception) -> Exception:
    """Map a botocore exception to InvalidSource (permanent) or Unavailable (transient)."""
    errors = botocore_errors()

    if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
        return InvalidSource(f"{uri}: no S3 credentials ({exc}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{uri}: S3 {code or status}: {error.get('Message', exc)}"
        if status in TRANSIENT_HTTP or code in {
            "SlowDown",
            "InternalError",
            "ServiceUnavailable",
            "RequestTimeout",
        }:
            return Unavailable(text)
        return InvalidSource(text)
    return Unavailable(f"{uri}: S3 unreachable: {exc}")


def _fetch_s3(uri: str, target: Path) -> Path:
    errors = botocore_errors()
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        keys = _s3_keys(client, bucket, key)
        if keys == [key]:
            path = target / (Path(key).name or "object")
            client.download_file(bucket, key, str(path))
            return path
        root = target / (Path(key.rstrip("/")).name or bucket)
        prefix = key.rstrip("/") + "/" if key else ""
        for obj in keys:
            rel = obj[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            dest = (root / rel).resolve()
            if root.resolve() not in dest.parents:
                raise InvalidSource(f"{uri}: object {obj!r} would land outside the download folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj, str(dest))
        return root
    except (errors.ClientError, errors.BotoCoreError) as exc:
        raise s3_error(uri, exc) from exc


def _s3_keys(client: Any, bucket: str, key: str) -> list[str]:
    """[key] when the object exists, else every key under key/ (a folder); none is an error."""
    if key and not key.endswith("/"):
        try:
            client.head_object(Bucket=bucket, Key=key)
            return [key]
        except botocore_errors().ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status != 404:
                raise
    prefix = key.rstrip("/") + "/" if key else ""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    if not keys:
        raise InvalidSource(f"s3://{bucket}/{key}: no such object or folder")
    return keys


# --- Hugging Face Hub ------------------------------------------------------------------------------


def _fetch_hf(uri: str, target: Path) -> Path:
    """hf://ORG/NAME[@REVISION] through huggingface_hub (HF_ENDPOINT, HF_TOKEN honoured)."""
    rest = uri.split("://", 1)[1]
    repo_id, _, revision = rest.partition("@")
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface-hub ships in the convert extra
        raise InvalidSpec("hf:// sources need huggingface-hub (pip install 'ptm[convert]')") from exc
    local = target / repo_id.replace("/", "--")
    permanent = (
        hf_errors.RepositoryNotFoundError,
        hf_errors.RevisionNotFoundError,
        hf_errors.EntryNotFoundError,
        hf_errors.GatedRepoError,
        hf_errors.HFValidationError,
        hf_errors.DisabledRepoError,
    )
    try:
        # HF_ENDPOINT is read here, not at import time, so a job's environment always counts
        snapshot_download(
            repo_id,
            revision=revision or None,
            local_dir=local,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except hf_errors.LocalEntryNotFoundError as exc:  # the hub did not answer as a hub (or offline mode)
        cause = exc.__cause__ or exc.__context__
        status = getattr(getattr(cause, "response", None), "status_code", None)
        first = str(exc).splitlines()[0]
        if isinstance(status, int) and 400 <= status < 500 and status not in TRANSIENT_HTTP:
            raise InvalidSource(f"{uri}: the hub answered HTTP {status}: {first}") from exc
        raise Unavailable(f"{uri}: cannot reach the hub: {first}") from exc
    except permanent as exc:
        raise InvalidSource(f"{uri}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # connection errors, 5xx, offline mode: may heal
        raise Unavailable(f"{uri}: cannot download from the hub: {type(exc).__name__}: {exc}") from exc
    return local
