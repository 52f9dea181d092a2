"""Run real sidecar processes the way a kubelet would: one per pod, identity in env vars.

Each sidecar authenticates with a real pod-bound service-account token obtained through the
TokenRequest API (what the kubelet mounts), so RBAC and the admission policy apply to it exactly as
in a cluster. Tests, the demo and the benchmarks all use this.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devcluster.build import ROOT, uv_binary
from devcluster.cluster import ControlPlane, free_port
from devcluster.kubelet import PodNetwork, UnsupportedSpec, mount_volumes, resolve_env, translate_paths
from devcluster.objects import Cluster
from devcluster.processes import DaemonProcess, inherited_environment
from sidecar.app.config import OPTIONS_BY_ENV
from sidecar.kube.api import ApiError

SIDECAR_SERVICE_ACCOUNT = "discovery-sidecar"


def write_token_kubeconfig(
    plane: ControlPlane, token: str, path: pathlib.Path, server: str | None = None
) -> pathlib.Path:
    """A kubeconfig for ``token``; ``server`` overrides the address (e.g. a fault-injecting proxy)."""
    cluster = {"server": server or plane.server, "certificate-authority": str(plane.ca_file)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@dataclass
class SidecarProcess(DaemonProcess):
    """One ``discovery-sidecar run`` subprocess for one pod."""

    kind = "sidecar"

    pod: Mapping[str, Any]
    kubeconfig: pathlib.Path
    service: str
    log_path: pathlib.Path
    labels: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    etcd_endpoints: str = ""  # set: the etcd backend (no kubeconfig, Service or UID; ETCD_ENDPOINTS instead)
    container_env: Mapping[str, str] | None = None  # set: exactly this environment, resolved from the pod spec
    build: pathlib.Path | None = None  # set: run the sidecar installed there (`build_sidecar`), not this checkout

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def settings(self) -> dict[str, str]:
        """The sidecar's own variables: what a pod spec's ``env`` would give it (identity, listen addresses)."""
        meta = self.pod["metadata"]
        if self.container_env is not None:  # resolved from the pod spec; the kubeconfig is the credential
            return {**self.container_env, "KUBECONFIG": str(self.kubeconfig), **self.extra_env}
        settings: dict[str, str] = {}
        if self.etcd_endpoints:
            settings.update(POD_NAME=meta["name"], POD_NAMESPACE=meta["namespace"], DYN_DISCOVERY_BACKEND="etcd")
            settings.update(ETCD_ENDPOINTS=self.etcd_endpoints)
        else:
            settings.update(
                POD_NAME=meta["name"],
                POD_NAMESPACE=meta["namespace"],
                POD_UID=meta["uid"],
                KUBECONFIG=str(self.kubeconfig),
                DISCOVERY_SERVICE_NAME=self.service,
            )
        settings.update(
            DISCOVERY_POD_LABELS=",".join(f"{k}={v}" for k, v in self.labels.items()),
            DISCOVERY_METADATA=json.dumps(dict(self.metadata)),
            DISCOVERY_GRPC_LISTEN=self.target,
            DISCOVERY_HTTP_LISTEN=f"127.0.0.1:{self.http_port}",
            DISCOVERY_PODINFO_DIR=str(self.log_path.parent / "no-podinfo"),
            DISCOVERY_LOG_FORMAT="json",
            DISCOVERY_BACKOFF_MAX="2s",
        )
        settings.update(self.extra_env)
        return settings

    def env(self) -> dict[str, str]:
        """The launched process's environment: this one's, less any sidecar setting it holds, plus ``settings``."""
        env = inherited_environment()
        if self.etcd_endpoints:
            env.pop("KUBECONFIG", None)
        env.update(self.settings())
        if self.build is not None:
            env["PYTHONPATH"] = str(self.build)
        return env

    def command(self) -> list[str]:
        """What runs the sidecar: this interpreter's ``sidecar.app.cli`` (``devcluster.image`` runs the image)."""
        return [sys.executable, "-m", "sidecar.app.cli", "run"]

    def working_directory(self) -> pathlib.Path | None:
        # A build's directory must come first on sys.path: `python -m` puts the working directory
        # there, and this checkout's would shadow it.
        return self.log_path.parent if self.build is not None else None

    def version(self) -> str:
        """The version this process said it runs (its last ``started`` log line), or empty."""
        started = [e for e in self.log_events() if e.get("event") == "started"]
        return str(started[-1].get("version", "")) if started else ""


def launch_sidecar(
    plane: ControlPlane,
    cluster: Cluster,
    pod: Mapping[str, Any],
    service: str,
    work_dir: pathlib.Path,
    labels: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_env: Mapping[str, str] | None = None,
    service_account: str = SIDECAR_SERVICE_ACCOUNT,
    server: str | None = None,
    start: bool = True,
) -> SidecarProcess:
    """Start a sidecar for ``pod`` under a pod-bound token of ``service_account`` (via ``server`` if given)."""
    name = pod["metadata"]["name"]
    namespace = pod["metadata"]["namespace"]
    token = cluster.pod_bound_token(namespace, service_account, pod)
    work_dir.mkdir(parents=True, exist_ok=True)
    kubeconfig = write_token_kubeconfig(plane, token, work_dir / f"{name}.kubeconfig", server)
    process = SidecarProcess(
        pod=pod,
        kubeconfig=kubeconfig,
        service=service,
        log_path=work_dir / f"{name}.log",
        labels=dict(labels if labels is not None else pod["metadata"].get("labels") or {}),
        metadata=dict(metadata or {}),
        extra_env=dict(extra_env or {}),
    )
    return process.start() if start else process


SIDECAR_CONTAINER = "discovery-sidecar"


def _config_map(cluster: Cluster, namespace: str, name: str) -> dict[str, str] | None:
    """A ConfigMap's data as the kubelet would mount it; None when there is none of that name."""
    try:
        found = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return {str(k): str(v) for k, v in (found.get("data") or {}).items()}


def launch_from_pod(
    plane: ControlPlane,
    cluster: Cluster,
    pod: Mapping[str, Any],
    work_dir: pathlib.Path,
    container: str = SIDECAR_CONTAINER,
    extra_env: Mapping[str, str] | None = None,
    start: bool = True,
) -> SidecarProcess:
    """Start the sidecar container of ``pod`` (as the API server returned it) the way a kubelet would.

    Its environment is resolved from the spec (``devcluster.kubelet``): field refs from the Pod object,
    its downward-API and emptyDir volumes under ``work_dir``, paths into them translated, its listen
    addresses moved to free loopback ports (one host stands in for the pod's network). Its credential is
    a real pod-bound token of the pod's service account, given as ``KUBECONFIG``. ``extra_env`` is for
    what a test or demo sets on purpose beyond the spec (say, a shorter backoff), and is named so."""
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    found = [c for c in [*(spec.get("initContainers") or ()), *spec["containers"]] if c["name"] == container]
    if len(found) != 1:
        raise UnsupportedSpec(f"pod {name} has {len(found)} containers named {container}")
    (sidecar,) = found
    if sidecar.get("args", ["run"])[:1] != ["run"]:
        raise UnsupportedSpec(f"pod {name}: the stand-in runs `discovery-sidecar run`, the spec says {sidecar['args']}")
    root = work_dir / name
    mounts = mount_volumes(pod, sidecar, root / "volumes", functools.partial(_config_map, cluster))
    env = translate_paths(resolve_env(pod, sidecar), mounts)
    podinfo_default = OPTIONS_BY_ENV["DISCOVERY_PODINFO_DIR"].default
    if "DISCOVERY_PODINFO_DIR" not in env and podinfo_default in mounts:
        env["DISCOVERY_PODINFO_DIR"] = str(mounts[podinfo_default])  # mounted where the sidecar looks
    network = PodNetwork(free_port)
    for variable in ("DISCOVERY_GRPC_LISTEN", "DISCOVERY_HTTP_LISTEN"):
        if variable in env:
            env[variable] = network.listen(env[variable])
    grpc = env.get("DISCOVERY_GRPC_LISTEN", "")
    http = env.get("DISCOVERY_HTTP_LISTEN", "")
    token = cluster.pod_bound_token(pod["metadata"]["namespace"], spec.get("serviceAccountName") or "default", pod)
    root.mkdir(parents=True, exist_ok=True)
    process = SidecarProcess(
        pod=pod,
        kubeconfig=write_token_kubeconfig(plane, token, root / "kubeconfig"),
        service="",
        log_path=root / "sidecar.log",
        extra_env=dict(extra_env or {}),
        container_env=env,
        grpc_port=int(grpc.rsplit(":", 1)[1]) if grpc.startswith("127.0.0.1:") else 0,
        http_port=int(http.rsplit(":", 1)[1]) if http.startswith("127.0.0.1:") else 0,
    )
    return process.start() if start else process


def build_sidecar(version: str, work_dir: pathlib.Path) -> pathlib.Path:
    """Build and install this checkout's sidecar as release ``version`` into ``work_dir/build``: a new build.

    What an upgrade of the sidecar container is: the same pod, the sidecar restarted from another build.
    The distribution is built from a copy of the sources with only the version changed (setuptools, by the
    pinned uv, without dependencies: the venv has them); a process started with ``build=`` runs it, and
    says its version in its ``started`` log line.
    """
    source = work_dir / "source"
    target = work_dir / "build"
    shutil.rmtree(work_dir, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sidecar", source / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    released = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    if released is None:
        raise RuntimeError("pyproject.toml has no `version = \"...\"` line")
    (source / "pyproject.toml").write_text(pyproject.replace(released.group(0), f'version = "{version}"', 1))
    subprocess.run(
        [str(uv_binary()), "pip", "install", "--quiet", "--no-deps", "--no-sources", "--target", str(target),
         "--python", sys.executable, str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def launch_etcd_sidecar(
    name: str,
    namespace: str,
    etcd_endpoints: str,
    work_dir: pathlib.Path,
    metadata: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    start: bool = True,
) -> SidecarProcess:
    """Start a sidecar on the etcd backend, as an etcd-backed Dynamo pod runs it: a pod name and
    namespace, ``DYN_DISCOVERY_BACKEND=etcd`` and ``ETCD_ENDPOINTS``; no API server at all."""
    work_dir.mkdir(parents=True, exist_ok=True)
    process = SidecarProcess(
        pod={"metadata": {"name": name, "namespace": namespace, "uid": ""}},
        kubeconfig=work_dir / "no-kubeconfig",
        service="",
        log_path=work_dir / f"{name}.log",
        labels=dict(labels or {}),
        metadata=dict(metadata or {}),
        extra_env=dict(extra_env or {}),
        etcd_endpoints=etcd_endpoints,
    )
    return process.start() if start else process
