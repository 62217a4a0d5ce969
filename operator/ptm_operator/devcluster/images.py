"""Build ptm's container images without a Docker engine (none runs on the dev machine).

The `convert` and `serve` targets of runtime_image/Dockerfile, plus a tiny `pause` image. An image is
a stack of cached layers, each a tar named by a key over what it is built from; importing it into a
node's containerd writes an OCI archive (oci.py) for `ctr images import` and deletes it afterwards
(containerd keeps its own copy of every layer: a kept archive would be a third 6 GB copy of torch):

- base: `debootstrap --variant=minbase` Debian bookworm (its python3 is CPython 3.11, like the host's),
  the `ptm` user (10001) and a hand-made venv at /opt/ptm; shared by convert and serve.
- deps-<target>: the third-party dependencies of the target's extra, read from pyproject.toml (the one
  source of truth), installed by the host's pip into /opt/ptm (cp311 manylinux wheels fit both).
- app: the ptm packages copied into site-packages, a dist-info and the `ptm` console script.
- pause: a static `pause` binary built from dev/node/pause.c.

An unchanged tree rebuilds nothing. Every file is written under a temporary name and renamed last,
so an interrupted build leaves nothing a later run would trust; a lock keeps two builds apart.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptm_operator.devcluster import REPO_ROOT, ClusterError, cache_dir, oci

TARGETS = ("pause", "convert", "serve")
PY = "3.11"  # bookworm's python3; the host's pip must be the same minor version
VENV = "/opt/ptm"
SITE = f"opt/ptm/lib/python{PY}/site-packages"
PACKAGES = ("operator/ptm_operator", "runtime_image/ptm_runtime")
PAUSE_SOURCE = REPO_ROOT / "dev" / "node" / "pause.c"

DEBOOTSTRAP = (
    "debootstrap",
    "--variant=minbase",
    "--include=python3,ca-certificates",
    "bookworm",
)
MIRROR = "http://deb.debian.org/debian"
#: Bump when the base recipe after debootstrap (user, venv, clean-up) changes.
BASE_REVISION = 2
UID = GID = 10001
PAUSE_CC = ("gcc", "-static", "-O2", "-s")

ENV = {
    "PATH": "/opt/ptm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "VIRTUAL_ENV": VENV,
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
CONFIGS = {
    "pause": oci.ImageConfig(entrypoint=["/pause"], user="65535:65535"),
    "convert": oci.ImageConfig(
        entrypoint=["ptm", "convert"], env=ENV, user=f"{UID}:{GID}", working_dir="/home/ptm"
    ),
    "serve": oci.ImageConfig(
        entrypoint=["ptm", "serve"],
        # a container listening on loopback is unreachable: listen on every interface
        env={**ENV, "PTM_SERVE_HOST": "0.0.0.0"},
        user=f"{UID}:{GID}",
        working_dir="/home/ptm",
        exposed_ports=[8080, 8081, 8082],
    ),
}

Log = Callable[[str], object]


@dataclass(frozen=True)
class BuiltImage:
    target: str
    name: str  # unqualified, e.g. "ptm-serve:abc123def456"
    layers: tuple[Path, ...]
    config: oci.ImageConfig

    def write_archive(self, path: Path) -> str:
        """An OCI archive of this image at `path`; returns the manifest digest."""
        return oci.write_archive(path, self.name, list(self.layers), self.config)


@dataclass(frozen=True)
class Layer:
    """A layer tar cached as `layers/<name>-<key>.tar`; `build(workdir, out)` writes it."""

    name: str
    key: str
    build: Callable[[Path, Path], None]


def images_dir() -> Path:
    return cache_dir() / "images"


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_pyproject(root: Path = REPO_ROOT) -> dict[str, Any]:
    with (root / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirements(pyproject: dict[str, Any], extra: str) -> list[str]:
    """The third-party requirements of `ptm[extra]` (the project itself is the app layer)."""
    project = pyproject["project"]
    reqs = [*project.get("dependencies", []), *project.get("optional-dependencies", {})[extra]]
    return list(dict.fromkeys(reqs))


def app_files(root: Path = REPO_ROOT) -> list[Path]:
    """The files the app layer copies (sorted, relative to `root`); bytecode is left out."""
    files = [
        path.relative_to(root)
        for package in PACKAGES
        for path in (root / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return sorted(files)


def app_key(root: Path = REPO_ROOT) -> str:
    h = hashlib.sha256()
    for rel in [*app_files(root), Path("pyproject.toml")]:
        data = (root / rel).read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def image_key(target: str, layer_keys: Sequence[str], config: oci.ImageConfig) -> str:
    return digest(target, list(layer_keys), asdict(config))


def run(step: str, argv: Sequence[str | Path], **kwargs: Any) -> str:
    """Run `argv`; on failure raise ClusterError naming `step`, with the tail of its output."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            umask=0o022,  # what lands in a layer must be readable by the image's user
            **kwargs,
        )
    except OSError as exc:
        raise ClusterError(f"{step}: cannot run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise ClusterError(f"{step} failed (exit {proc.returncode}): {shlex.join(args)}\n{tail}")
    output: str = proc.stdout
    return output


def tar(step: str, root: Path, out: Path, *, root_owned: bool) -> None:
    """Tar the entries of `root` (not `root` itself: its mode would become the image's `/`)."""
    owner = ["--owner=0", "--group=0"] if root_owned else []
    names = sorted(p.name for p in root.iterdir())
    run(step, ["tar", "--sort=name", "--numeric-owner", *owner, "-C", root, "-cf", out, "--", *names])


def mounts_under(path: Path) -> list[Path]:
    """Mount points below `path`, deepest first."""
    prefix = f"{path.resolve()}/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((Path(p) for p in points if p.startswith(prefix)), key=lambda p: -len(p.parts))


def remove_tree(path: Path) -> None:
    """`rm -rf` that never crosses into a mount: a killed debootstrap leaves /proc mounted in its rootfs."""
    if os.path.lexists(path):
        for mount in mounts_under(path):
            run(f"unmount {mount}", ["umount", mount])
        run(f"remove {path}", ["rm", "-rf", "--one-file-system", path])


def clear(directory: Path) -> None:
    for child in directory.iterdir() if directory.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# -- base: Debian minbase + python3, the ptm user, an empty venv --------------------------------------


def build_base(work: Path, out: Path) -> None:
    rootfs = work / "rootfs"
    run("debootstrap", [*DEBOOTSTRAP, rootfs, MIRROR])
    if mounts := mounts_under(rootfs):
        raise ClusterError(f"debootstrap left mounts in the rootfs: {', '.join(map(str, mounts))}")
    version = run(
        "read the rootfs python version",
        ["chroot", rootfs, "/usr/bin/python3", "-c", "import platform; print(platform.python_version())"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    ).strip()
    if not version.startswith(PY + "."):
        raise ClusterError(f"the base image has python {version}, the layers expect {PY}")
    etc = rootfs / "etc"
    for file, line in [
        ("passwd", f"ptm:x:{UID}:{GID}::/home/ptm:/usr/sbin/nologin"),
        ("group", f"ptm:x:{GID}:"),
        ("shadow", "ptm:!::0:99999:7:::"),
        ("gshadow", "ptm:!::"),
    ]:
        with (etc / file).open("a") as f:
            f.write(line + "\n")
    home = rootfs / "home" / "ptm"
    home.mkdir(mode=0o755, parents=True)
    os.chown(home, UID, GID)
    # What `python -m venv /opt/ptm` makes (Debian's python3 has no ensurepip; pip runs on the host).
    venv = rootfs / VENV.lstrip("/")
    (venv / "lib" / f"python{PY}" / "site-packages").mkdir(parents=True)
    (venv / "lib64").symlink_to("lib")
    (venv / "bin").mkdir()
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "bin" / f"python{PY}").symlink_to("python3")
    (venv / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {version}\n"
        f"executable = /usr/bin/python{PY}\ncommand = /usr/bin/python3 -m venv {VENV}\n"
    )
    for directory in [
        "var/cache/apt",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
    ]:
        clear(rootfs / directory)
    # The runtime provides /dev, /proc, /sys and bind-mounts these files; keep them, empty.
    for directory in ["dev", "proc", "sys"]:
        clear(rootfs / directory)
    for file in ["etc/hostname", "etc/resolv.conf"]:  # debootstrap copied the host's (and its mode)
        (rootfs / file).write_text("")
        (rootfs / file).chmod(0o644)
    tar("tar the base layer", rootfs, out, root_owned=False)


# -- deps: the extra's third-party packages, installed by the host's pip ------------------------------


def deps_layer(target: str, pyproject: dict[str, Any]) -> Layer:
    reqs = requirements(pyproject, target)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--ignore-installed",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        "--progress-bar=off",
    ]

    def build(work: Path, out: Path) -> None:
        if sys.version_info[:2] != tuple(int(p) for p in PY.split(".")):
            raise ClusterError(f"the deps layers need pip on python {PY}, not {sys.version.split()[0]}")
        staging = work / "root"
        prefix = staging / VENV.lstrip("/")
        run(f"pip install the {target} dependencies", [*pip, "--prefix", prefix, *reqs])
        site = staging / SITE
        if target == "serve" and (any(site.glob("torch")) or any(site.glob("torch-*.dist-info"))):
            raise ClusterError("torch must not be in the serve image")
        # pip wrote the host interpreter into the scripts' shebangs
        host = f"#!{sys.executable}\n".encode()
        for script in (prefix / "bin").iterdir() if (prefix / "bin").is_dir() else ():
            data = script.read_bytes() if script.is_file() else b""
            if data.startswith(host):
                script.write_bytes(f"#!{VENV}/bin/python\n".encode() + data[len(host) :])
        staging.chmod(0o755)
        tar(f"tar the {target} dependencies layer", staging, out, root_owned=True)

    return Layer(f"deps-{target}", digest("deps", target, PY, pip[3:], reqs), build)


# -- app: the ptm packages, a dist-info, the console scripts ------------------------------------------


def app_layer(pyproject: dict[str, Any], root: Path = REPO_ROOT) -> Layer:
    project = pyproject["project"]
    scripts: dict[str, str] = project.get("scripts", {})

    def build(work: Path, out: Path) -> None:
        staging = work / "root"
        site = staging / SITE
        for rel in app_files(root):
            dest = site / rel.relative_to(rel.parts[0])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)
            dest.chmod(0o644)
        dist_info = site / f"{project['name']}-{project['version']}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        )
        (dist_info / "INSTALLER").write_text("ptm-images\n")
        entry_points = "".join(f"{name} = {target}\n" for name, target in scripts.items())
        (dist_info / "entry_points.txt").write_text(f"[console_scripts]\n{entry_points}")
        bin_dir = staging / VENV.lstrip("/") / "bin"
        bin_dir.mkdir(parents=True)
        for name, target in scripts.items():
            module, func = target.split(":")
            script = bin_dir / name
            script.write_text(
                f"#!{VENV}/bin/python\nimport sys\nfrom {module} import {func}\n\n"
                f'if __name__ == "__main__":\n    sys.exit({func}())\n'
            )
            script.chmod(0o755)
        for path in staging.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        staging.chmod(0o755)
        tar("tar the app layer", staging, out, root_owned=True)

    return Layer("app", app_key(root), build)


# -- pause ------------------------------------------------------------------------------------------


def write_pause_layer(binary: Path, out: Path) -> None:
    """A layer holding only /pause (0755, root), with a fixed mtime so that it is reproducible."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as layer, binary.open("rb") as f:
        info = tarfile.TarInfo("pause")
        info.size = binary.stat().st_size
        info.mode = 0o755
        layer.addfile(info, f)


def pause_layer(source: Path = PAUSE_SOURCE) -> Layer:
    def build(work: Path, out: Path) -> None:
        binary = work / "pause"
        run("compile pause", [*PAUSE_CC, "-o", binary, source])
        write_pause_layer(binary, out)

    return Layer("pause", digest("pause", PAUSE_CC, source.read_text()), build)


def base_layer() -> Layer:
    return Layer("base", digest("base", DEBOOTSTRAP, MIRROR, BASE_REVISION, UID, PY), build_base)


def plan(target: str, root: Path = REPO_ROOT) -> list[Layer]:
    """The layers of `target`, bottom first (cheap: nothing is built)."""
    if target == "pause":
        return [pause_layer()]
    if target not in ("convert", "serve"):
        raise ClusterError(f"unknown image target {target!r}; known: {', '.join(TARGETS)}")
    pyproject = load_pyproject(root)
    return [base_layer(), deps_layer(target, pyproject), app_layer(pyproject, root)]


# -- build ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(directory: Path, *, exclusive: bool = True) -> Iterator[None]:
    """A build holds the cache alone (and first removes what an interrupted build left); an import
    shares it, so that no build prunes the archive it reads."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            yield
            return
        tmp = directory / "tmp"
        remove_tree(tmp)
        for partial in [*directory.glob("*.tmp"), *directory.glob("layers/*.tmp")]:
            partial.unlink()
        tmp.mkdir()
        try:
            yield
        finally:
            remove_tree(tmp)


def layer_path(directory: Path, layer: Layer) -> Path:
    return directory / "layers" / f"{layer.name}-{layer.key[:16]}.tar"


def ensure_layer(directory: Path, layer: Layer, log: Log) -> Path:
    path = layer_path(directory, layer)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{layer.name}-", dir=directory / "tmp"))
    log(f"building layer {layer.name} ...")
    started = time.monotonic()
    try:
        partial = path.with_name(path.name + ".tmp")
        layer.build(work, partial)
        partial.replace(path)
    finally:
        remove_tree(work)
    size = path.stat().st_size / 2**20
    log(f"built layer {path.name} in {time.monotonic() - started:.0f}s ({size:.0f} MiB)")
    return path


def prune(directory: Path, layers: Sequence[Layer], log: Log) -> None:
    """Remove the layers an older tree built for these kinds of layer (and archives older builds
    kept): a changed dependency list would otherwise leave a 6 GB layer behind."""
    keep = {layer_path(directory, layer) for layer in layers}
    kinds = {layer.name for layer in layers}
    for path in [*directory.glob("*.oci.tar"), *directory.glob("layers/*.tar")]:
        if path.suffixes[-2:] == [".oci", ".tar"] or (
            path not in keep and path.name.rsplit("-", 1)[0] in kinds
        ):
            log(f"removing the stale {path.name}")
            path.unlink()


def build(targets: Sequence[str] = TARGETS, log: Log | None = None) -> dict[str, BuiltImage]:
    """Build (or find cached) the images of `targets`; returns them by target."""
    say: Log = log or (lambda _: None)
    plans = {target: plan(target) for target in targets}
    directory = images_dir()
    built: dict[str, BuiltImage] = {}
    with locked(directory):
        for target, layers in plans.items():
            config = CONFIGS[target]
            key12 = image_key(target, [layer.key for layer in layers], config)[:12]
            paths = tuple(ensure_layer(directory, layer, say) for layer in layers)
            built[target] = BuiltImage(target, f"ptm-{target}:{key12}", paths, config)
        prune(directory, [layer for layers in plans.values() for layer in layers], say)
    return built


def import_into_containerd(image: BuiltImage, address: str, ctr: str = "ctr") -> None:
    """Load `image` into containerd's CRI namespace (`k8s.io`) unless it is there already."""
    base = [ctr, "--address", address, "--namespace", "k8s.io", "images"]
    listed = run(f"list the images in containerd at {address}", [*base, "ls", "-q"]).split()
    if oci.qualified(image.name) in listed:
        return
    directory = images_dir()
    imports = directory / "imports"
    imports.mkdir(parents=True, exist_ok=True)
    with locked(directory, exclusive=False), tempfile.TemporaryDirectory(dir=imports) as scratch:
        archive = Path(scratch) / f"{image.target}.oci.tar"
        image.write_archive(archive)
        run(f"import {image.name} into containerd at {address}", [*base, "import", archive])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptm_operator.devcluster.images", description="build ptm's images without Docker"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    build_cmd = sub.add_parser("build", help="build the images into the cache (a no-op when cached)")
    build_cmd.add_argument("--target", action="append", choices=TARGETS, dest="targets")
    build_cmd.add_argument(
        "--archive-dir",
        type=Path,
        help="also write each image as an OCI archive there (for `ctr images import` or `podman load`)",
    )
    args = parser.parse_args(argv)
    try:
        images = build(args.targets or TARGETS, log=lambda msg: print(msg, file=sys.stderr))
        for image in images.values():
            where = ""
            if args.archive_dir is not None:
                args.archive_dir.mkdir(parents=True, exist_ok=True)
                archive = args.archive_dir / f"{image.target}.oci.tar"
                image.write_archive(archive)
                where = f"\t{archive}"
            print(f"{image.name}{where}")
    except ClusterError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
