"""Build the control-plane binaries and the Go tools from pinned Go modules, once, into ``~/.cache``.

The cache key covers everything that changes the output (go.mod, go.sum, the Go version and the link
flags), so a warm machine skips the build entirely and a version bump rebuilds. The cold build of
k8s.io/kubernetes on a 2-core machine takes long enough that silence would look like a hang, so
``go build -v`` is run and the number of packages compiled is reported periodically.

Besides the control plane (one module, ``hack/controlplane``), ``GO_TOOLS`` lists programs the dev
cluster runs beside it that no registry ships as a binary (kwok's simulated kubelets). Each has a module
of its own under ``hack/tools/<name>`` and so its own cache key: bumping a tool never rebuilds the
control plane, and the control plane's build never waits for a tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "hack" / "controlplane"
TOOLS_DIR = ROOT / "hack" / "tools"
CACHE_ROOT = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "discovery-sidecar"

BINARIES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "etcd": "go.etcd.io/etcd/server/v3",
}

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(f"[devcluster] {message}", file=sys.stderr, flush=True)


def pinned_versions() -> dict[str, str]:
    text = (MODULE_DIR / "go.mod").read_text()
    kubernetes = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", text, re.M)
    etcd = re.search(r"^\s*go\.etcd\.io/etcd/server/v3 (v\S+)", text, re.M)
    if not kubernetes or not etcd:
        raise RuntimeError(f"{MODULE_DIR / 'go.mod'} must require k8s.io/kubernetes and go.etcd.io/etcd/server/v3")
    return {"kubernetes": kubernetes.group(1), "etcd": etcd.group(1)}


def ldflags(versions: dict[str, str]) -> str:
    """Version stamps: kube-apiserver refuses to run as "v0.0.0" against its own emulation version."""
    k8s = versions["kubernetes"]
    major, minor = k8s.lstrip("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={k8s}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
            f"-X {package}.buildDate=1970-01-01T00:00:00Z",
        ]
    flags.append(f"-X go.etcd.io/etcd/api/v3/version.GitSHA={versions['etcd']}")
    return " ".join(["-s", "-w", *flags])


def go_toolchain(purpose: str = "the control plane") -> str:
    """The ``go`` command, or a clear error saying what it was needed for."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(f"the Go toolchain is required to build {purpose} (https://go.dev/dl); `go` is not on PATH")
    return go


def cache_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((MODULE_DIR / name).read_bytes())
    digest.update(
        subprocess.run([go_toolchain(), "version"], capture_output=True, text=True, check=True).stdout.encode()
    )
    digest.update(ldflags(versions).encode())
    return f"k8s-{versions['kubernetes']}-etcd-{versions['etcd']}-{digest.hexdigest()[:12]}"


def uv_binary() -> pathlib.Path:
    """The pinned uv that made and reads ``uv.lock`` (installed by ``make venv`` from hack/uv.requirements)."""
    pinned = re.search(r"^uv==(\S+)", (ROOT / "hack" / "uv.requirements").read_text(), re.M)
    if not pinned:
        raise RuntimeError("hack/uv.requirements must pin uv==<version>")
    uv = CACHE_ROOT / f"uv-{pinned.group(1)}" / "bin" / "uv"
    if not uv.is_file():
        raise RuntimeError(f"{uv} is missing: `make venv` installs the pinned uv there")
    return uv


def bin_dir() -> pathlib.Path:
    return CACHE_ROOT / "controlplane" / cache_key(pinned_versions()) / "bin"


def _run_with_progress(
    cmd: list[str], env: dict[str, str], label: str, log: Log, cwd: pathlib.Path = MODULE_DIR
) -> None:
    started = time.monotonic()
    compiled = 0
    tail: list[str] = []
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def report() -> None:
        while not done.wait(20):
            log(f"{label}: {compiled} packages compiled, {time.monotonic() - started:.0f}s elapsed")

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    assert process.stderr is not None
    for line in process.stderr:
        compiled += 1
        tail = (tail + [line.rstrip()])[-30:]
    code = process.wait()
    done.set()
    if code != 0:
        raise RuntimeError(f"{label} failed (exit {code}); last output:\n" + "\n".join(tail))
    log(f"{label}: done, {compiled} packages in {time.monotonic() - started:.0f}s")


def ensure_built(log: Log = _say) -> pathlib.Path:
    """Return the directory holding the four binaries, building them first if needed."""
    versions = pinned_versions()
    target = bin_dir()
    if all((target / name).is_file() for name in BINARIES):
        return target
    log(
        f"building the control plane (Kubernetes {versions['kubernetes']}, etcd {versions['etcd']}) into {target}; "
        "a cold build takes about 20-30 minutes on 2 cores, later runs reuse it"
    )
    env = dict(os.environ, GOFLAGS="-buildvcs=false")
    started = time.monotonic()
    _run_with_progress([go_toolchain(), "mod", "download", "-x"], env, "downloading Go modules", log)
    staging = target.parent / "bin.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _run_with_progress(
        [go_toolchain(), "build", "-v", "-ldflags", ldflags(versions), "-o", str(staging) + "/", *BINARIES.values()],
        env,
        "compiling",
        log,
    )
    (staging / "server").rename(staging / "etcd")  # go.etcd.io/etcd/server/v3 builds as "server"
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    info = {"versions": versions, "seconds": round(time.monotonic() - started), "built_at": time.time()}
    (target.parent / "build-info.json").write_text(json.dumps(info, indent=2))
    log(f"control plane built in {info['seconds']}s")
    return target


# -- Go tools: one pinned module each ------------------------------------------------------------------
@dataclass(frozen=True)
class GoTool:
    """A Go program the dev cluster runs, built from ``hack/tools/<name>`` (its go.mod pins ``module``)."""

    name: str  # the binary's name; also its folder under hack/tools/ and under the cache
    package: str  # the main package to build
    module: str  # the pinned module whose version names the cache folder
    purpose: str  # what it is for, in the build log and in errors
    ldflags: str = "-s -w"

    @property
    def module_dir(self) -> pathlib.Path:
        return TOOLS_DIR / self.name


GO_TOOLS: dict[str, GoTool] = {
    tool.name: tool
    for tool in (
        GoTool(
            "kwok", "sigs.k8s.io/kwok/cmd/kwok", "sigs.k8s.io/kwok", "simulated nodes and kubelets (devcluster.kwok)"
        ),
    )
}
"""Every Go tool, by name; ``python -m devcluster build`` builds them all, ``ensure_tool`` one on demand."""


def tool_version(tool: GoTool) -> str:
    found = re.search(
        rf"^\s*(?:require\s+)?{re.escape(tool.module)} (v\S+)", (tool.module_dir / "go.mod").read_text(), re.M
    )
    if not found:
        raise RuntimeError(f"{tool.module_dir / 'go.mod'} must require {tool.module}")
    return found.group(1)


def tool_path(tool: GoTool) -> pathlib.Path:
    """Where the tool's binary is (or will be) cached: keyed on its go.mod, go.sum, the Go version, the flags."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((tool.module_dir / name).read_bytes())
    go = go_toolchain(tool.purpose)
    digest.update(subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout.encode())
    digest.update(tool.ldflags.encode())
    key = f"{tool.name}-{tool_version(tool)}-{digest.hexdigest()[:12]}"
    return CACHE_ROOT / "tools" / tool.name / key / tool.name


def ensure_tool(name: str, log: Log = _say) -> pathlib.Path:
    """Return the path of Go tool ``name`` (a key of ``GO_TOOLS``), building it first if needed."""
    tool = GO_TOOLS[name]
    target = tool_path(tool)
    if target.is_file():
        return target
    log(f"building {tool.name} {tool_version(tool)} ({tool.purpose}) into {target.parent}")
    env = dict(os.environ, GOFLAGS="-buildvcs=false")
    started = time.monotonic()
    go = go_toolchain(tool.purpose)
    _run_with_progress([go, "mod", "download", "-x"], env, f"{tool.name}: downloading Go modules", log, tool.module_dir)
    staging = target.with_name(target.name + ".partial")
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.unlink(missing_ok=True)
    _run_with_progress(
        [go, "build", "-v", "-ldflags", tool.ldflags, "-o", str(staging), tool.package],
        env,
        f"{tool.name}: compiling",
        log,
        tool.module_dir,
    )
    staging.rename(target)
    info = {"version": tool_version(tool), "seconds": round(time.monotonic() - started), "built_at": time.time()}
    (target.parent / "build-info.json").write_text(json.dumps(info, indent=2))
    log(f"{tool.name} built in {info['seconds']}s")
    return target


def build_all(log: Log = _say) -> dict[str, pathlib.Path]:
    """The control plane and every Go tool: what ``python -m devcluster build`` (and so ``make test``) makes."""
    built = {"controlplane": ensure_built(log)}
    for name in GO_TOOLS:
        built[name] = ensure_tool(name, log)
    return built


if __name__ == "__main__":
    print(ensure_built())
