"""The artifact store: `<store>/<namespace>/<name>/<revision>/{model.onnx, report.json}`.

A revision's folder is complete or absent, never half-written, so a killed job can never
leave something that looks like a finished artifact:

- local (a path, file:// or a mounted pvc://): files are written and fsynced into a hidden
  staging folder beside the destination (`.<revision>.partial-<random>`), report last, and the
  folder is renamed into place in one step. A crash leaves only the hidden staging folder,
  which the next successful commit of that revision removes.
- s3: the artifact objects are uploaded first and report.json last; a revision counts as
  present only when its report is there and the artifact's size and recorded sha256 match.

A revision that is already complete is reused as it is (the converter does nothing).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

from ptm_runtime.convert.errors import InvalidSpec, Unavailable
from ptm_runtime.convert.locations import (
    DEFAULT_PVC_ROOT,
    botocore_errors,
    local_path,
    s3_client,
    s3_error,
    split_s3,
    to_uri,
)
from ptm_runtime.report import MODEL_FILE, REPORT_FILE, Report, sha256_file

log = logging.getLogger(__name__)

_COMPONENT = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")


def check_component(kind: str, value: str) -> str:
    if not _COMPONENT.match(value) or value in {".", ".."}:
        raise InvalidSpec(f"{kind} {value!r} is not usable as a path component (letters, digits, -_. only)")
    return value


class Store(Protocol):
    uri: str

    def uri_of(self, namespace: str, name: str, revision: str, filename: str) -> str: ...

    def find(self, namespace: str, name: str, revision: str) -> Report | None: ...

    def commit(
        self, namespace: str, name: str, revision: str, files: dict[str, Path], report: Report
    ) -> Report: ...


def open_store(uri: str, pvc_root: Path = DEFAULT_PVC_ROOT) -> Store:
    """A store for a local path, file://, pvc:// or s3:// URI."""
    uri = to_uri(uri)
    if uri.startswith("s3://"):
        return S3Store(uri)
    path = local_path(uri, pvc_root)
    if path is None:
        raise InvalidSpec(f"store {uri}: use a path, file://, pvc:// or s3:// URI")
    return LocalStore(path, uri.rstrip("/"))


class LocalStore:
    """A folder (a mounted volume in the cluster)."""

    def __init__(self, root: Path, uri: str) -> None:
        self.root = root
        self.uri = uri

    def _dir(self, namespace: str, name: str, revision: str) -> Path:
        return (
            self.root
            / check_component("namespace", namespace)
            / check_component("name", name)
            / check_component("revision", revision)
        )

    def uri_of(self, namespace: str, name: str, revision: str, filename: str) -> str:
        return f"{self.uri}/{namespace}/{name}/{revision}/{filename}"

    def find(self, namespace: str, name: str, revision: str) -> Report | None:
        final = self._dir(namespace, name, revision)
        if not (final / REPORT_FILE).is_file():
            return None
        try:
            report = Report.read(final)
            complete = (final / MODEL_FILE).is_file() and sha256_file(final / MODEL_FILE) == report.sha256
        except (OSError, ValueError) as exc:
            log.warning("artifact at %s is unreadable (%s)", final, exc)
            complete = False
            report = None
        if complete:
            return report
        # cannot happen through this store (the rename is atomic): someone edited it by hand
        aside = final.with_name(f".{revision}.corrupt-{uuid.uuid4().hex[:8]}")
        log.warning("artifact at %s does not match its report; moving it to %s", final, aside)
        final.rename(aside)
        return None

    def commit(
        self, namespace: str, name: str, revision: str, files: dict[str, Path], report: Report
    ) -> Report:
        final = self._dir(namespace, name, revision)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.with_name(f".{revision}.partial-{uuid.uuid4().hex[:12]}")
            staging.mkdir()
            try:
                for filename, src in files.items():
                    shutil.copyfile(src, staging / filename)
                    _fsync(staging / filename)
                report.write(staging)
                _fsync(staging / REPORT_FILE)
                _fsync(staging)
                try:
                    staging.rename(final)
                except OSError:
                    existing = self.find(namespace, name, revision)
                    if existing is None:
                        raise
                    log.info("revision %s was committed concurrently; keeping that one", revision)
                    shutil.rmtree(staging, ignore_errors=True)
                    return existing
                _fsync(final.parent)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            for stale in final.parent.glob(f".{revision}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as exc:
            raise Unavailable(f"store {self.uri}: cannot write {final}: {exc}") from exc
        return report


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    """s3://BUCKET[/PREFIX]; endpoint and credentials as for s3 sources."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(self.uri + "/")
        self.prefix = self.prefix.rstrip("/")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, namespace: str, name: str, revision: str, filename: str) -> str:
        parts = [
            check_component("namespace", namespace),
            check_component("name", name),
            check_component("revision", revision),
            filename,
        ]
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def uri_of(self, namespace: str, name: str, revision: str, filename: str) -> str:
        return f"s3://{self.bucket}/{self._key(namespace, name, revision, filename)}"

    def find(self, namespace: str, name: str, revision: str) -> Report | None:
        errors = botocore_errors()
        key = self._key(namespace, name, revision, REPORT_FILE)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except errors.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                return None
            raise _store_error(self.uri, exc) from exc
        except errors.BotoCoreError as exc:
            raise _store_error(self.uri, exc) from exc
        report = Report.model_validate_json(body)
        try:
            head = self.client.head_object(
                Bucket=self.bucket, Key=self._key(namespace, name, revision, MODEL_FILE)
            )
        except errors.ClientError as exc:
            if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 404:
                return None
            raise _store_error(self.uri, exc) from exc
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        if head.get("ContentLength") != report.size_bytes or meta.get("sha256") != report.sha256:
            log.warning("s3 artifact for revision %s does not match its report; converting again", revision)
            return None
        return report

    def commit(
        self, namespace: str, name: str, revision: str, files: dict[str, Path], report: Report
    ) -> Report:
        errors = botocore_errors()
        try:
            for filename, src in files.items():
                self.client.upload_file(
                    str(src),
                    self.bucket,
                    self._key(namespace, name, revision, filename),
                    ExtraArgs={"Metadata": {"sha256": sha256_file(src)}},
                )
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(namespace, name, revision, REPORT_FILE),
                Body=report.model_dump_json(by_alias=True, exclude_none=True, indent=2).encode(),
                ContentType="application/json",
            )
        except (errors.ClientError, errors.BotoCoreError) as exc:
            raise _store_error(self.uri, exc) from exc
        return report


def _store_error(uri: str, exc: Exception) -> Exception:
    mapped = s3_error(uri, exc)
    if isinstance(mapped, Unavailable):
        return mapped
    # a missing bucket or refused credentials is a configuration problem of the store
    return InvalidSpec(f"store {mapped}")
