"""Build the sidecar's OCI image without Docker, from Debian's packages and ``uv.lock``, and run it.

This machine (and CI) has no Docker engine and no registry, so the Dockerfile cannot be built here. This
module builds an image of the same content from what the machine can reach, then runs it with podman, so
that "the image starts and works as a sidecar" is shown, not assumed (docs/image.md):

1. **base** (layer 1): a distroless-style Debian 12 root filesystem. ``mmdebstrap --variant=extract``
   unpacks ``python3.11`` (the interpreter the lock's cp311 wheels need; Debian 13 has 3.13),
   ``libstdc++6`` (grpcio's C++ runtime), ``base-files`` and ``netbase`` with their dependencies from
   bookworm, bookworm-updates and bookworm-security, without maintainer scripts: no shell, no apt, no
   package manager state but ``/var/lib/dpkg/status.d/`` (one control file per package, as distroless
   images record them for scanners). Then the non-root user 65532 in ``/etc/passwd``.
2. **venv** (layer 2): ``/opt/venv``, made by the pinned uv *inside* that root filesystem (a chroot in a
   private mount namespace, the base mounted read-only) with ``uv sync --frozen --no-editable`` from the
   Dockerfile's own build context (.dockerignore): exactly ``uv.lock``, by hash, the sidecar and its
   client installed as wheels. Nothing else is left in the image (no uv, no sources, no caches).
3. **assemble**: umoci puts the two layers into an OCI image layout; the image config (user, entry
   point, command, environment, working directory, port, labels) is the Dockerfile's final stage's,
   read from the Dockerfile, with the version from pyproject.toml.

Each result is cached under ``~/.cache/discovery-sidecar/image/``: the base keyed by its recipe (suite,
packages), the image keyed by the base, the build context's content (lock, pyproject files, sources),
uv's version and the Dockerfile's final stage. A warm run does nothing; a source change rebuilds the venv
layer only. The Debian archive moves (security updates), so a rebuilt base may differ from a cached one:
``--rebuild-base`` takes the archive's current packages.

Running: skopeo copies the layout into podman's storage (as ``localhost/discovery-sidecar:<version>-<digest>``;
``podman run oci:<path>`` would derive a name from the path, and ``~/.cache`` is not a valid one), then
``podman run`` (rootful) with runc (crun 1.8 refuses this machine's hybrid cgroup hierarchy), the host
network (the dev API server listens on 127.0.0.1), a read-only root filesystem, no capabilities and no
privilege escalation (the example workload's securityContext).
``ImageSidecar`` runs the image as a pod's sidecar against the dev control plane the way a kubelet
would: a pod-bound token, CA and namespace mounted at the service-account path (the sidecar's in-cluster
configuration), the downward-API files in /etc/podinfo, the gRPC socket in a shared directory.

    python -m devcluster.image build [--rebuild] [--rebuild-base]   # prints the image reference
    python -m devcluster.image run                                  # a control plane, two pods, the image

Building needs root (mmdebstrap, chroot, mount) and Debian's mmdebstrap, umoci, skopeo, podman and runc
(``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import pathlib
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from devcluster.build import CACHE_ROOT, ROOT, Log, ensure_built, uv_binary
from devcluster.cluster import ControlPlane
from devcluster.dockerfile import DockerIgnore, Instruction, load, parse_env
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.sidecars import SIDECAR_SERVICE_ACCOUNT, SidecarProcess, launch_sidecar
from devcluster.sockets import short_socket_dir
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, PeerSetView
from sidecar.kube.api import KubeApi

IMAGE_CACHE = CACHE_ROOT / "image"
RECIPE = 1  # bump when the build steps below change what they produce (it is part of every cache key)

SUITE = "bookworm"  # Debian 12: Python 3.11, the minor version the lock's wheels and the Dockerfile use
PACKAGES = ("base-files", "netbase", "python3.11", "libstdc++6")
PYTHON = "/usr/bin/python3.11"
# Documentation, manual pages and translations stay out; the packages' copyright files stay in.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
USER_ID = 65532  # the Dockerfile's USER; the manifests' runAsUser
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # $PATH before the Dockerfile's ENV
VENV = "/opt/venv"
REQUIRED_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "umoci": "umoci",
    "skopeo": "skopeo",
    "podman": "podman",
    "runc": "runc",
    "chroot": "coreutils",
}
RUNTIME = "runc"  # crun 1.8 (Debian 12) refuses a hybrid cgroup v1/v2 hierarchy, which this machine has
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LOCAL_REPOSITORY = "localhost/discovery-sidecar"  # the images in podman's storage
KEEP = 3  # cached images (and bases) kept per kind; older ones are removed after a build
VENV_BUILD = {"UV_COMPILE_BYTECODE": "1", "SOURCE_DATE_EPOCH": "315532800"}
"""As the Dockerfile's builder: the venv ships .pyc, checked by hash (a layer need not keep the sources' mtimes).
Part of the image's key: a change rebuilds the venv."""

# In a private mount namespace: the base read-only, the build's own directories writable over it, the
# host's /dev, a /proc and the host's resolv.conf (uv downloads what its cache lacks), then uv in a chroot.
_CHROOT_SCRIPT = r"""
set -eu
root=$1 work=$2 venv=$3 uv_cache=$4
shift 4
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --bind "$work" "$root/tmp"
mount --bind "$uv_cache" "$root/tmp/uv-cache"
mount --bind "$venv" "$root$VENV_DIR"
if [ -f /etc/resolv.conf ]; then mount --bind /etc/resolv.conf "$root/etc/resolv.conf"; fi
exec chroot "$root" "$@"
"""


def _say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def project_version(root: pathlib.Path = ROOT) -> str:
    return str(tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"])


def require_tools() -> None:
    """Fail with what to install, before anything is built."""
    missing = sorted({package for tool, package in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise RuntimeError(
            f"building and running the image needs Debian's {', '.join(missing)}: "
            f"apt-get install -y {' '.join(missing)} (.ci/run installs them)"
        )
    if os.geteuid() != 0:
        raise RuntimeError(
            "building the image here needs root (mmdebstrap, chroot and mount); "
            "without root, build the Dockerfile with Docker instead (docs/image.md)"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- what the image is made of ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The Dockerfile's final stage as an OCI image config: what ``docker build`` would have set."""

    user: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    exposed_ports: list[str]
    labels: dict[str, str]

    @classmethod
    def from_dockerfile(cls, version: str) -> ImageConfig:
        final = load().final
        env: dict[str, str] = {}
        scope = {"PATH": BASE_PATH}
        for instruction in final.all("ENV"):
            values = parse_env(instruction, scope)
            env.update(values)
            scope.update(values)
        labels: dict[str, str] = {}
        for instruction in final.all("LABEL"):  # ARG VERSION's default is pyproject's version (test_version)
            labels.update(parse_env(Instruction("LABEL", instruction.args, instruction.line), {"VERSION": version}))
        env.setdefault("PATH", BASE_PATH)

        def one(keyword: str) -> Instruction:
            found = final.last(keyword)
            if found is None:
                raise RuntimeError(f"the Dockerfile's final stage has no {keyword}")
            return found

        entrypoint, cmd = one("ENTRYPOINT").exec_form, one("CMD").exec_form
        if entrypoint is None or cmd is None:
            raise RuntimeError("the Dockerfile's ENTRYPOINT and CMD must be JSON arrays (exec form)")
        ports = [f"{p}/tcp" if "/" not in p else p for e in final.all("EXPOSE") for p in e.operands()]
        return cls(
            user=one("USER").args,
            entrypoint=entrypoint,
            cmd=cmd,
            env=env,
            workdir=one("WORKDIR").args,
            exposed_ports=ports,
            labels=labels,
        )

    def umoci_flags(self) -> list[str]:
        flags = [f"--config.user={self.user}", f"--config.workingdir={self.workdir}"]
        flags += [f"--config.entrypoint={word}" for word in self.entrypoint]
        flags += [f"--config.cmd={word}" for word in self.cmd]
        flags += [f"--config.env={key}={value}" for key, value in self.env.items()]
        flags += [f"--config.exposedports={port}" for port in self.exposed_ports]
        flags += [f"--config.label={key}={value}" for key, value in self.labels.items()]
        return flags


def base_key() -> str:
    recipe = json.dumps({"recipe": RECIPE, "suite": SUITE, "packages": PACKAGES, "dpkg": DPKG_OPTIONS, "uid": USER_ID})
    return f"{SUITE}-{_sha256(recipe.encode())[:12]}"


def context_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """The Dockerfile's build context (``.dockerignore`` decides): what the venv is built from."""
    return DockerIgnore.load(root / ".dockerignore").files(root)


def image_key(config: ImageConfig, root: pathlib.Path = ROOT) -> str:
    """What the image is made of: the base's key, uv's version, the config and every context file."""
    digest = hashlib.sha256()
    digest.update(base_key().encode())
    digest.update(uv_binary().parent.parent.name.encode())  # uv-<version>
    digest.update(json.dumps(config.__dict__, sort_keys=True).encode())
    digest.update(json.dumps(VENV_BUILD, sort_keys=True).encode())
    for path in context_files(root):
        digest.update(path.as_posix().encode() + b"\0" + _sha256((root / path).read_bytes()).encode())
    return f"{project_version(root)}-{digest.hexdigest()[:12]}"


# -- the built image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A built image: an OCI image layout directory and its tag, with what the build measured."""

    layout: pathlib.Path
    tag: str
    info: dict[str, Any]

    @property
    def reference(self) -> str:
        """The OCI layout as skopeo and podman name it: ``oci:<layout>:<tag>``."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def local_name(self) -> str:
        """Its name in podman's storage, tagged with the version and the manifest's digest (``podman run``
        cannot take the layout itself: it derives a name from the path, and ``~/.cache`` is not a valid one)."""
        return f"{LOCAL_REPOSITORY}:{self.tag}-{self._index_entry()['digest'].partition(':')[2][:16]}"

    def _index_entry(self) -> dict[str, Any]:
        index = json.loads((self.layout / "index.json").read_text())
        for entry in index["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag:
                return dict(entry)
        raise RuntimeError(f"{self.layout} has no image tagged {self.tag}")

    def _blob(self, digest: str) -> bytes:
        algorithm, _, hex_digest = digest.partition(":")
        return (self.layout / "blobs" / algorithm / hex_digest).read_bytes()

    def manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(self._blob(self._index_entry()["digest"]))
        return manifest

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self._blob(self.manifest()["config"]["digest"]))
        return config


def _tree_bytes(path: pathlib.Path) -> int:
    """Apparent size of everything under ``path`` (files and symlinks, each hard link once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            stat = os.lstat(os.path.join(directory, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time on this machine (worktrees and test runs share the cache)."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with (IMAGE_CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str], log: Log, what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n" + "\n".join(output[-40:]))
    return result


def _prune(kind: str, keep: pathlib.Path) -> None:
    """Keep the newest ``KEEP`` cached entries of one kind (``base-*``, ``oci-*``), always ``keep``."""
    entries = sorted(IMAGE_CACHE.glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [e for e in entries if e != keep and not e.name.endswith(".partial")][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_base(log: Log = _say, rebuild: bool = False) -> pathlib.Path:
    """The base root filesystem (layer 1), built with mmdebstrap if it is not cached."""
    target = IMAGE_CACHE / f"base-{base_key()}"
    rootfs = target / "rootfs"
    if (target / "packages.json").is_file() and not rebuild:
        return rootfs
    started = time.monotonic()
    log(f"base: mmdebstrap --variant=extract {SUITE} {' '.join(PACKAGES)} (with their dependencies) ...")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    partial = staging / "rootfs"
    argv = ["mmdebstrap", "--mode=root", "--variant=extract", f"--include={','.join(PACKAGES)}"]
    argv += [f"--dpkgopt={option}" for option in DPKG_OPTIONS]
    argv += ["--skip=cleanup/apt/cache", SUITE, str(partial)]  # the .debs stay until recorded below
    _run(argv, log, "mmdebstrap", timeout=900)
    packages = _record_packages(partial)
    _finish_base(partial)
    info = {
        "suite": SUITE,
        "packages": packages,
        "seconds": round(time.monotonic() - started, 1),
        "built_at": time.time(),
    }
    (staging / "packages.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _prune("base", target)
    log(f"base: {len(packages)} Debian packages, {_tree_bytes(rootfs) / 2**20:.1f} MiB, in {info['seconds']}s")
    return rootfs


def _record_packages(rootfs: pathlib.Path) -> dict[str, str]:
    """Write each unpacked package's control file to /var/lib/dpkg/status.d/ (scanners read it)."""
    archives = rootfs / "var" / "cache" / "apt" / "archives"
    status_d = rootfs / "var" / "lib" / "dpkg" / "status.d"
    status_d.mkdir(parents=True, exist_ok=True)
    packages: dict[str, str] = {}
    for deb in sorted(archives.glob("*.deb")):
        control = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(": ", 1) for line in control.splitlines() if ": " in line and not line.startswith(" "))
        packages[fields["Package"]] = fields["Version"]
        (status_d / fields["Package"]).write_text(control)
    shutil.rmtree(archives)
    return packages


def _finish_base(rootfs: pathlib.Path) -> None:
    """What an unpacked set of packages lacks to be an image's root: users, mount points, no host files."""
    for leftover in ("etc/apt", "var/lib/apt", "var/cache/apt", "var/log", "etc/hostname"):
        path = rootfs / leftover
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (rootfs / "etc" / "resolv.conf").write_text("")  # the container runtime mounts its own over it
    (rootfs / "etc" / "passwd").write_text(
        f"root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:{USER_ID}:{USER_ID}:nonroot:/home/nonroot:/usr/sbin/nologin\n"
    )
    (rootfs / "etc" / "group").write_text(f"root:x:0:\nnonroot:x:{USER_ID}:\n")
    home = rootfs / "home" / "nonroot"
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, USER_ID, USER_ID)
    for directory in ("dev", "proc", "sys", "root", "tmp", VENV.lstrip("/")):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "root").chmod(0o700)


def _install_venv(rootfs: pathlib.Path, venv: pathlib.Path, log: Log) -> None:
    """``uv sync --frozen --no-editable`` of the build context, run inside ``rootfs`` into ``venv``."""
    work = venv.parent / "work"
    shutil.rmtree(work, ignore_errors=True)
    source = work / "src"
    for relative in context_files():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, source / relative)
    shutil.copy2(uv_binary(), work / "uv")
    (work / "uv-cache").mkdir()
    (work / "home").mkdir()
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp/home",
        "UV_CACHE_DIR": "/tmp/uv-cache",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PROJECT_ENVIRONMENT": VENV,
        "UV_LINK_MODE": "copy",
        "UV_NO_PROGRESS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **VENV_BUILD,
        "VENV_DIR": VENV,
    }
    # Reach the package index as this machine does: its proxy settings and CA bundle, if any.
    env.update({k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")})
    for name in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL"):
        if name in os.environ:
            env[name] = os.environ[name]
    ca_bundle = os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(ca_bundle):
        shutil.copy2(ca_bundle, work / "ca.crt")
        env["SSL_CERT_FILE"] = "/tmp/ca.crt"
    host_cache = _run([str(uv_binary()), "cache", "dir"], log, "uv cache dir").stdout.strip()
    pathlib.Path(host_cache).mkdir(parents=True, exist_ok=True)
    uv = ["/tmp/uv", "sync", "--directory", "/tmp/src", "--frozen", "--no-editable", "--python", PYTHON]
    log(f"venv: {' '.join(uv[1:])} in a chroot of the base (uv cache: {host_cache}) ...")
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _CHROOT_SCRIPT, "sh"]
    argv += [str(rootfs), str(work), str(venv), host_cache, *uv]
    try:
        _run(argv, log, "uv sync in the image's root filesystem", env=env, timeout=900)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_image(log: Log = _say, rebuild: bool = False, rebuild_base: bool = False) -> Image:
    """The image, built (or reused from the cache) as the module docstring describes."""
    require_tools()
    version = project_version()
    config = ImageConfig.from_dockerfile(version)
    target = IMAGE_CACHE / f"oci-{image_key(config)}"
    with _build_lock():
        if (target / "build-info.json").is_file() and not (rebuild or rebuild_base):
            os.utime(target)  # most recently used: kept by _prune
            info = json.loads((target / "build-info.json").read_text())
            log(f"cached: {describe(info)}")
            return Image(target / "layout", version, info)
        started = time.monotonic()
        log(f"building the image {version} into {target} (cold: a few minutes; later runs reuse it)")
        rootfs = ensure_base(log, rebuild=rebuild_base)
        base_seconds = time.monotonic() - started
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        venv = staging / "venv"
        venv.mkdir()
        venv_started = time.monotonic()
        _install_venv(rootfs, venv, log)
        venv_seconds = time.monotonic() - venv_started
        assemble_started = time.monotonic()
        layout = staging / "layout"
        image = f"{layout}:{version}"
        log("assemble: umoci, two layers (the base, /opt/venv) and the Dockerfile's config ...")
        _run(["umoci", "init", "--layout", str(layout)], log, "umoci init")
        _run(["umoci", "new", "--image", image], log, "umoci new")
        base_packages = json.loads((rootfs.parent / "packages.json").read_text())["packages"]
        _run(
            [
                "umoci",
                "insert",
                "--image",
                image,
                "--history.author=devcluster.image",
                f"--history.created_by=mmdebstrap --variant=extract {SUITE} {' '.join(PACKAGES)} "
                f"({len(base_packages)} packages)",
                str(rootfs),
                "/",
            ],
            log,
            "umoci insert (base)",
        )
        lock_digest = _sha256((ROOT / "uv.lock").read_bytes())
        _run(
            [
                "umoci",
                "insert",
                "--image",
                image,
                "--history.author=devcluster.image",
                f"--history.created_by=uv sync --frozen --no-editable (uv.lock sha256:{lock_digest})",
                str(venv),
                VENV,
            ],
            log,
            "umoci insert (venv)",
        )
        _run(
            [
                "umoci",
                "config",
                "--image",
                image,
                "--os=linux",
                f"--architecture={_architecture()}",
                "--history.author=devcluster.image",
                "--history.created_by=the Dockerfile's final stage's config",
                *config.umoci_flags(),
            ],
            log,
            "umoci config",
        )
        _run(["umoci", "gc", "--layout", str(layout)], log, "umoci gc")
        built = Image(layout, version, {})
        layers = built.manifest()["layers"]
        info = {
            "version": version,
            "reference": f"oci:{target / 'layout'}:{version}",
            "uv_lock_sha256": lock_digest,
            "base": {"suite": SUITE, "packages": base_packages},
            "layers": [{"digest": layer["digest"], "compressed_bytes": layer["size"]} for layer in layers],
            "compressed_bytes": sum(layer["size"] for layer in layers),
            "unpacked_bytes": {"base": _tree_bytes(rootfs), "venv": _tree_bytes(venv)},
            "seconds": {
                "base": round(base_seconds, 1),
                "venv": round(venv_seconds, 1),
                "assemble": round(time.monotonic() - assemble_started, 1),
                "total": round(time.monotonic() - started, 1),
            },
            "built_at": time.time(),
        }
        shutil.rmtree(venv)
        (staging / "build-info.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        _prune("oci", target)
        log(describe(info))
        return Image(target / "layout", version, info)


def describe(info: Mapping[str, Any]) -> str:
    """One line: the sizes and build times of a built image (its build-info.json)."""
    mib = 2**20
    unpacked = info["unpacked_bytes"]
    layers = " + ".join(f"{layer['compressed_bytes'] / mib:.1f}" for layer in info["layers"])
    seconds = info["seconds"]
    return (
        f"image {info['version']}: {info['compressed_bytes'] / mib:.1f} MiB compressed ({layers} MiB layers), "
        f"{(unpacked['base'] + unpacked['venv']) / mib:.1f} MiB unpacked (base {unpacked['base'] / mib:.1f} MiB, "
        f"/opt/venv {unpacked['venv'] / mib:.1f} MiB); built in {seconds['total']}s (base {seconds['base']}s, "
        f"venv {seconds['venv']}s, assemble {seconds['assemble']}s)"
    )


def _architecture() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# -- running it ------------------------------------------------------------------------------------


def load_into_podman(image: Image, log: Log = _say) -> str:
    """Copy the image into podman's storage (once) with skopeo; return its local name.

    Images no longer in the cache (``_prune`` removed them) are removed from podman's storage too (best
    effort: one still in use stays)."""
    if subprocess.run(["podman", "image", "exists", image.local_name], capture_output=True).returncode != 0:
        log(f"skopeo copy {image.reference} containers-storage:{image.local_name}")
        _run(["skopeo", "copy", "--quiet", image.reference, f"containers-storage:{image.local_name}"], log, "skopeo")
        cached = set()
        for info in IMAGE_CACHE.glob("oci-*/build-info.json"):
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                cached.add(Image(info.parent / "layout", json.loads(info.read_text())["version"], {}).local_name)
        listed = _run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", LOCAL_REPOSITORY], log, "podman")
        for name in set(listed.stdout.split()) - cached - {image.local_name}:
            subprocess.run(["podman", "image", "rm", name], capture_output=True, timeout=60)
    return image.local_name


def podman_run_argv(
    image: Image,
    name: str,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    mounts: Sequence[tuple[pathlib.Path, str, bool]] = (),
    entrypoint: str | None = None,
) -> list[str]:
    """``podman run`` of ``image`` as a restricted pod's container (``mounts``: host path, path, read-only)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    argv = [
        "podman",
        f"--runtime={RUNTIME}",
        "run",
        "--rm",
        f"--name={name}",
        "--network=host",
        "--read-only",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        # podman would raise these limits, which this machine does not let even root do
        f"--ulimit=nofile={soft}:{hard}",
        "--ulimit=nproc=4096:4096",
    ]
    for key, value in (env or {}).items():
        argv.append(f"--env={key}={value}")
    for host, container, read_only in mounts:
        argv.append(f"--volume={host}:{container}:{'ro' if read_only else 'rw'}")
    if entrypoint is not None:
        argv.append(f"--entrypoint={entrypoint}")
    return [*argv, load_into_podman(image), *args]


def run_in_image(image: Image, *args: str, entrypoint: str | None = None, timeout: float = 120) -> str:
    """Run the image once (its entry point, or ``entrypoint``) with ``args``; return what it printed."""
    name = f"discovery-sidecar-once-{secrets.token_hex(4)}"
    result = subprocess.run(
        podman_run_argv(image, name, args, entrypoint=entrypoint), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"the image exited {result.returncode}: {' '.join(args)}\n{result.stderr[-4000:]}")
    return result.stdout


def _terminate_with_parent() -> None:
    """preexec_fn: the kernel sends the child SIGTERM when the thread that started it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@dataclass
class ImageSidecar(SidecarProcess):
    """A pod's sidecar run from the image by podman, configured the way a kubelet would configure it.

    Identity comes from the downward-API files (/etc/podinfo) and the pod's env; the API server from the
    service-account mount and ``KUBERNETES_SERVICE_HOST``/``PORT`` (the in-cluster configuration, no
    kubeconfig); the gRPC API is a Unix socket in a directory shared with the host (the worker)."""

    image: Image | None = None
    plane: ControlPlane | None = None
    token: str = ""
    container: str = field(default_factory=lambda: f"discovery-sidecar-{secrets.token_hex(6)}")
    # The directory shared with the container as /run/discovery: short, for the socket path's sake
    # (devcluster.sockets); removed by ``remove``.
    socket_dir: pathlib.Path = field(default_factory=lambda: short_socket_dir("ds-image-"))

    @property
    def files(self) -> pathlib.Path:
        return self.log_path.parent / f"{self.name}.pod"

    @property
    def socket(self) -> pathlib.Path:
        return self.socket_dir / "discovery.sock"

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def settings(self) -> dict[str, str]:
        assert self.plane is not None
        meta = self.pod["metadata"]
        settings = {
            "POD_NAME": meta["name"],
            "POD_NAMESPACE": meta["namespace"],
            "POD_UID": meta["uid"],
            "DISCOVERY_SERVICE_NAME": self.service,
            "DISCOVERY_GRPC_LISTEN": "unix:///run/discovery/discovery.sock",
            "DISCOVERY_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "DISCOVERY_METADATA": json.dumps(dict(self.metadata)),
            "DISCOVERY_BACKOFF_MAX": "2s",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.plane.apiserver_port),
        }
        settings.update(self.extra_env)
        return settings

    def env(self) -> dict[str, str]:
        """podman's own environment; the container's is ``settings`` (passed as ``--env``)."""
        return {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERY_", "POD_", "KUBE"))}

    def _write_pod_files(self) -> list[tuple[pathlib.Path, str, bool]]:
        assert self.plane is not None
        meta = self.pod["metadata"]
        shutil.rmtree(self.files, ignore_errors=True)
        account = self.files / "serviceaccount"
        podinfo = self.files / "podinfo"
        shared = self.socket_dir
        for directory in (account, podinfo):
            directory.mkdir(parents=True)
        shared.mkdir(exist_ok=True)
        (account / "token").write_text(self.token)
        shutil.copy(self.plane.ca_file, account / "ca.crt")
        (account / "namespace").write_text(meta["namespace"])
        labels = self.labels or meta.get("labels") or {}
        podinfo_files = {
            "pod_name": meta["name"],
            "pod_namespace": meta["namespace"],
            "pod_uid": meta["uid"],
            "labels": "\n".join(f'{k}="{v}"' for k, v in sorted(labels.items())),
        }
        for name, text in podinfo_files.items():
            (podinfo / name).write_text(text)
        for directory in (account, podinfo):  # the kubelet's default mode for these volumes: 0644 files
            for item in directory.iterdir():
                item.chmod(0o644)
        os.chown(shared, USER_ID, USER_ID)  # the pod's fsGroup: the sidecar (65532) creates its socket here
        return [
            (account, SERVICE_ACCOUNT_DIR, True),
            (podinfo, "/etc/podinfo", True),
            (shared, "/run/discovery", False),
        ]

    def command(self) -> list[str]:
        assert self.image is not None
        mounts = self._write_pod_files()
        return podman_run_argv(self.image, self.container, ["run"], env=self.settings(), mounts=mounts)

    def start(self) -> ImageSidecar:
        """Start ``podman run``, told to end the container if this process dies (SIGTERM, which podman
        passes on: the sidecar shuts down and ``--rm`` removes it), so a killed test run leaves no container."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_terminate_with_parent,
        )
        log.close()
        return self

    def container_pid(self) -> int:
        """The sidecar's process as this machine sees it (podman inspect)."""
        result = _run(["podman", "inspect", "--format", "{{.State.Pid}}", self.container], _say, "podman inspect")
        return int(result.stdout.strip())

    def kill(self) -> None:
        subprocess.run(["podman", "kill", "--signal=KILL", self.container], capture_output=True, timeout=60)
        super().kill()

    def remove(self) -> None:
        """Make sure the container is gone (a test's teardown; podman's own --rm covers normal exits), and
        its socket directory."""
        subprocess.run(["podman", "rm", "--force", "--time=0", self.container], capture_output=True, timeout=60)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def launch_image_sidecar(
    image: Image,
    plane: ControlPlane,
    cluster: Cluster,
    pod: Mapping[str, Any],
    service: str,
    work_dir: pathlib.Path,
    metadata: Mapping[str, Any] | None = None,
    service_account: str = SIDECAR_SERVICE_ACCOUNT,
) -> ImageSidecar:
    """Start ``image`` as ``pod``'s sidecar under a pod-bound token of ``service_account``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    process = ImageSidecar(
        pod=pod,
        kubeconfig=work_dir / "no-kubeconfig",
        service=service,
        log_path=work_dir / f"{pod['metadata']['name']}.log",
        labels=dict(pod["metadata"].get("labels") or {}),
        metadata=dict(metadata or {}),
        image=image,
        plane=plane,
        token=cluster.pod_bound_token(pod["metadata"]["namespace"], service_account, pod),
    )
    process.start()
    return process


# -- command line ----------------------------------------------------------------------------------


def _run_demo(image: Image) -> int:
    """A fresh control plane, a Service and two pods: one with the image as its sidecar, one with the
    sidecar from this checkout. Shows the image's CR (owned by its pod) and its WatchPeers snapshot."""
    namespace = "image-demo"
    with tempfile.TemporaryDirectory(prefix="discovery-image-") as tmp:
        work = pathlib.Path(tmp)
        plane = ControlPlane(bin_dir=ensure_built(), work_dir=work / "controlplane")
        plane.start()
        api = KubeApi.from_kubeconfig(str(plane.kubeconfig))
        processes: list[SidecarProcess] = []
        try:
            kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}"]
            manifests = ROOT / "manifests"
            _run(
                [*kubectl, "apply", "-f", str(manifests / "crd.yaml"), "-f", str(manifests / "admission-policy.yaml")],
                _say,
                "kubectl apply",
            )
            _run(
                [*kubectl, "wait", "--for=condition=Established", "crd/dynamoworkermetadatas.nvidia.com"], _say, "wait"
            )
            cluster = Cluster(api)
            cluster.ensure_node("node-a", "zone-a")
            cluster.create_namespace(namespace)
            _run([*kubectl, "apply", "-n", namespace, "-f", str(manifests / "rbac.yaml")], _say, "kubectl apply")
            cluster.wait_for_service_account(namespace, SIDECAR_SERVICE_ACCOUNT)
            cluster.create_service(namespace, "workers", {"app": "w"})
            from_image = cluster.start_pod(namespace, "from-image", {"app": "w", "role": "prefill"})
            from_checkout = cluster.start_pod(namespace, "from-checkout", {"app": "w", "role": "decode"})
            _say(f"starting {image.reference} as the sidecar of pod {namespace}/from-image (podman, uid {USER_ID})")
            sidecar = launch_image_sidecar(image, plane, cluster, from_image, "workers", work / "sidecars")
            processes.append(sidecar)
            processes.append(launch_sidecar(plane, cluster, from_checkout, "workers", work / "sidecars"))
            for process in processes:
                process.wait_ready(90)
            cr = api.get(WORKER_METADATA.item(namespace, "from-image"))
            owners = [(o["kind"], o["name"], o["uid"]) for o in cr["metadata"]["ownerReferences"]]
            _say(f"its DynamoWorkerMetadata {namespace}/from-image is owned by {owners}")
            view = PeerSetView()
            with contextlib.closing(DiscoveryClient(sidecar.target)) as client:
                deadline = threading.Timer(60, client.close)  # a stream that never shows the peer fails here
                deadline.start()
                try:
                    for update in client.watch(view=view):
                        peers = {p.name: pb.PeerState.Name(p.state) for p in view.peers.values()}
                        _say(f"WatchPeers on {sidecar.target}: {update.kind} {peers}")
                        if "from-checkout" in peers:
                            break
                finally:
                    deadline.cancel()
            code = sidecar.terminate()
            _say(f"SIGTERM: the image's sidecar exited {code}")
            return 0 if code == 0 else 1
        finally:
            for process in processes:
                process.kill()
                if isinstance(process, ImageSidecar):
                    process.remove()
            api.close()
            plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster.image", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--rebuild", action="store_true", help="build the venv layer again even if cached")
    parser.add_argument("--rebuild-base", action="store_true", help="also fetch the Debian packages again")
    args = parser.parse_args(argv)
    image = ensure_image(rebuild=args.rebuild, rebuild_base=args.rebuild_base)
    if args.command == "build":
        print(image.reference)
        return 0
    return _run_demo(image)


if __name__ == "__main__":
    sys.exit(main())
