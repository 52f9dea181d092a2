"""Build the control-plane binaries and the Go tools from pinned Go modules, once, into ``~/.cache``.

The cache key covers everything that changes the output (go.mod, go.sum, the Go version and the link
flags), so a warm machine skips the build entirely and a version bump rebuilds. The cold build of
k8s.io/kubernetes on a 2-core machine takes long enough that silence would look like a hang, so
``go build -v`` is run and the number of packages compiled is reported periodically.

Besides the control plane, the tests and ``make lint`` need a few Go programs that no package registry
ships (actionlint, buf, helm, kwok). Each is one row of ``GO_TOOLS``: its own pinned module under ``hack/`` (so a
tool's version bump rebuilds that tool only, never the control plane), built into a cache directory keyed
like the control plane's, and linked into the control plane's ``bin`` directory, beside ``kubectl``,
where tests and users find it. ``ensure_tool`` builds one tool alone (``make lint`` needs no control
plane).
"""

from __future__ import annotations

import fcntl
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
CACHE_ROOT = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "discovery-sidecar"

BINARIES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    "etcd": "go.etcd.io/etcd/server/v3",
}

Log = Callable[[str], None]


@dataclass(frozen=True)
class GoTool:
    """One Go program built from its own pinned module (a row of ``GO_TOOLS``)."""

    binary: str  # the file name in the bin directory
    module: str  # the module directory under hack/ whose go.mod/go.sum pin it
    package: str  # the command package `go build` builds
    version_of: str  # the required module whose version names the cache directory
    version_ldflags: tuple[str, ...] = ()  # -X flags, "{version}" replaced by that version

    @property
    def module_dir(self) -> pathlib.Path:
        return ROOT / self.module

    def version(self) -> str:
        text = (self.module_dir / "go.mod").read_text()
        found = re.search(rf"^\s*(?:require\s+)?{re.escape(self.version_of)} (v\S+)", text, re.M)
        if not found:
            raise RuntimeError(f"{self.module_dir / 'go.mod'} must require {self.version_of}")
        return found.group(1)

    def ldflags(self) -> str:
        return " ".join(["-s", "-w", *(flag.format(version=self.version()) for flag in self.version_ldflags)])


GO_TOOLS = (
    GoTool(
        binary="actionlint",
        module="hack/tools/actionlint",
        package="github.com/rhysd/actionlint/cmd/actionlint",
        version_of="github.com/rhysd/actionlint",
        version_ldflags=("-X github.com/rhysd/actionlint.version={version}",),
    ),
    # protos/'s linter and breaking-change checker (`make lint`); its version is a constant in its source.
    GoTool(
        binary="buf",
        module="hack/tools/buf",
        package="github.com/bufbuild/buf/cmd/buf",
        version_of="github.com/bufbuild/buf",
    ),
    # the chart tests' and the demo's helm (charts/discovery-sidecar against the real API server)
    GoTool(
        binary="helm",
        module="hack/tools/helm",
        package="helm.sh/helm/v4/cmd/helm",
        version_of="helm.sh/helm/v4",
        version_ldflags=(
            "-X helm.sh/helm/v4/internal/version.version={version}",
            "-X helm.sh/helm/v4/internal/version.gitTreeState=clean",
        ),
    ),
    # simulated nodes and kubelets, so that a Deployment's pods run (devcluster.kwok; its version is a constant)
    GoTool(
        binary="kwok",
        module="hack/tools/kwok",
        package="sigs.k8s.io/kwok/cmd/kwok",
        version_of="sigs.k8s.io/kwok",
    ),
)
"""The Go tools beside the control plane; a new tool is a module under hack/tools/ and one row here."""


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


def _digest(module_dir: pathlib.Path, flags: str) -> str:
    """What changes a build's output: the module's go.mod and go.sum, the Go version, the link flags."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((module_dir / name).read_bytes())
    digest.update(
        subprocess.run([go_toolchain(), "version"], capture_output=True, text=True, check=True).stdout.encode()
    )
    digest.update(flags.encode())
    return digest.hexdigest()[:12]


def cache_key(versions: dict[str, str]) -> str:
    return f"k8s-{versions['kubernetes']}-etcd-{versions['etcd']}-{_digest(MODULE_DIR, ldflags(versions))}"


def tool_path(tool: GoTool) -> pathlib.Path:
    """Where ``tool``'s binary is cached (its own key: only its own module changes it)."""
    key = f"{tool.binary}-{tool.version()}-{_digest(tool.module_dir, tool.ldflags())}"
    return CACHE_ROOT / "tools" / key / tool.binary


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
    """Return the directory holding the four binaries and the Go tools, building what is missing first."""
    target = _ensure_controlplane(log)
    for tool in GO_TOOLS:
        _link(_ensure_tool(tool, log), target / tool.binary)
    return target


def _link(built: pathlib.Path, link: pathlib.Path) -> None:
    """Point ``link`` at ``built`` (atomically: a test running beside this never sees it missing)."""
    if link.is_symlink() and link.resolve() == built.resolve():
        return
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(built)
    staging.replace(link)


def ensure_tool(name: str, log: Log = _say) -> pathlib.Path:
    """The path of the Go tool ``name`` (a row of ``GO_TOOLS``), building it alone if it is missing.

    ``make lint`` needs actionlint and buf without the control plane, whose cold build takes far longer."""
    tools = {tool.binary: tool for tool in GO_TOOLS}
    if name not in tools:
        raise RuntimeError(f"no Go tool named {name!r}; GO_TOOLS has {', '.join(sorted(tools))}")
    return _ensure_tool(tools[name], log)


def _ensure_tool(tool: GoTool, log: Log) -> pathlib.Path:
    target = tool_path(tool)
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per tool (tests, the demo and `make` may all ask at once); the others wait, then
    # find it built.
    with open(target.parent.parent / f".{tool.binary}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        log(f"building {tool.binary} {tool.version()} ({tool.package}) into {target.parent}; later runs reuse it")
        env = dict(os.environ, GOFLAGS="-buildvcs=false", CGO_ENABLED="0")
        started = time.monotonic()
        go = go_toolchain(tool.binary)
        download = [go, "mod", "download", "-x"]
        _run_with_progress(download, env, f"{tool.binary}: downloading Go modules", log, tool.module_dir)
        staging = target.parent.with_name(target.parent.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        build = [go, "build", "-v", "-trimpath", "-ldflags", tool.ldflags(), "-o", str(staging / tool.binary)]
        _run_with_progress([*build, tool.package], env, f"{tool.binary}: compiling", log, tool.module_dir)
        shutil.rmtree(target.parent, ignore_errors=True)
        staging.rename(target.parent)
        log(f"{tool.binary} built in {time.monotonic() - started:.0f}s")
    return target


def _ensure_controlplane(log: Log) -> pathlib.Path:
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


if __name__ == "__main__":
    print(ensure_built())
