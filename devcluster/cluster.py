"""Run etcd, kube-apiserver and kube-controller-manager on loopback.

Everything lives in one work directory (data, keys, logs, kubeconfig) and on random free ports, so
several control planes can run side by side. The processes are started in their own process group
and, when ``tie_to_parent`` is set (tests), with ``PR_SET_PDEATHSIG`` so that they die with the Python
process even if it is killed without a chance to clean up. ``make cluster-up`` starts a detached one
and records its PIDs so ``make cluster-down`` can stop it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import pathlib
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from devcluster import pki

ADMIN_USER = "devcluster-admin"
CONTROLLERS = (
    "garbage-collector-controller",
    "endpointslice-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "deployment-controller",
    "replicaset-controller",
)
"""What tests need from kube-controller-manager: GC of owned objects, EndpointSlices for Services,
the ``default`` ServiceAccount in new namespaces (pods need it), namespace deletion, and Deployments
rolled out through their ReplicaSets (whose pods run only on kwok's simulated nodes, ``devcluster.kwok``:
without a scheduler, any other pod a ReplicaSet makes stays Pending and never in an EndpointSlice)."""

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(f"[devcluster] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL the child when the parent thread dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: pathlib.Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, tie_to_parent: bool, env: dict[str, str] | None = None) -> None:
        """Start the process; ``env`` adds to (or overrides) this process's environment."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env={**os.environ, **env} if env else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent if tie_to_parent else None,
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ControlPlane:
    """A running (or startable) etcd + kube-apiserver + kube-controller-manager."""

    bin_dir: pathlib.Path
    work_dir: pathlib.Path
    tie_to_parent: bool = True
    log: Log = _say
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    kcm_port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    components: dict[str, Component] = field(default_factory=dict)

    # -- addresses --------------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.work_dir / "kubeconfig"

    @property
    def ca_file(self) -> pathlib.Path:
        return self.work_dir / "pki" / "ca.crt"

    @property
    def kubectl(self) -> pathlib.Path:
        return self.bin_dir / "kubectl"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        paths = pki.write_pki(self.work_dir / "pki")
        (self.work_dir / "tokens.csv").write_text(f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        self._write_kubeconfig()
        self.components = {
            "etcd": Component("etcd", self._etcd_argv(), self.work_dir / "etcd.log"),
            "kube-apiserver": Component(
                "kube-apiserver", self._apiserver_argv(paths), self.work_dir / "kube-apiserver.log"
            ),
            "kube-controller-manager": Component(
                "kube-controller-manager", self._kcm_argv(), self.work_dir / "kube-controller-manager.log"
            ),
        }
        try:
            self.log(f"starting etcd on {self.etcd_url}")
            self.components["etcd"].start(self.tie_to_parent)
            self._wait("etcd", self._etcd_healthy, timeout)
            self.start_apiserver(timeout)
            self.log("starting kube-controller-manager")
            self.components["kube-controller-manager"].start(self.tie_to_parent)
            self._wait("kube-controller-manager", self._kcm_healthy, timeout)
        except BaseException:
            self.stop()
            raise
        self.log(f"control plane ready in {time.monotonic() - started:.1f}s; kubeconfig: {self.kubeconfig}")

    def start_apiserver(self, timeout: float = 120.0) -> None:
        self.log(f"starting kube-apiserver on {self.server}")
        self.components["kube-apiserver"].start(self.tie_to_parent)
        self._wait("kube-apiserver", self._apiserver_ready, timeout)

    def stop_apiserver(self) -> None:
        self.components["kube-apiserver"].stop()

    def restart_controller_manager(self, timeout: float = 120.0) -> None:
        """A fresh kube-controller-manager, its informers listed anew.

        After the API server has been away, the running one recovers on client-go's schedule: each informer
        reconnects after a backoff of up to 30 s, and until the EndpointSlice informer has seen the
        controller's own writes, every Service's sync fails ("informer cache is out of date") and is retried
        with a growing delay. A test that takes the API server away restarts it afterwards, so the tests after
        it do not inherit that recovery.
        """
        component = self.components["kube-controller-manager"]
        component.stop()
        self.log("restarting kube-controller-manager")
        component.start(self.tie_to_parent)
        self._wait("kube-controller-manager", self._kcm_healthy, timeout)

    def restart_apiserver(self, timeout: float = 120.0) -> None:
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            component = self.components.get(name)
            if component is not None:
                component.stop()

    def pids(self) -> dict[str, int]:
        return {n: c.process.pid for n, c in self.components.items() if c.process is not None}

    # -- etcd maintenance -------------------------------------------------------------------------
    def etcd_revision(self) -> int:
        reply = self._etcd_post("/v3/kv/range", {"key": "AA==", "limit": 1})
        return int(reply["header"]["revision"])

    def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd's history up to ``revision`` (default: now), as kube-apiserver does every 5 min."""
        revision = revision or self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def compact_past_every_watch(self) -> int:
        """Compact etcd so that no watch position handed out so far can be resumed: each gets 410 Gone.

        Call with the API server stopped. A client may hold the newest revision (a bookmark carries it), and
        resuming at revision R asks for R + 1 onwards, which a compaction at R + 1 still keeps. Two writes
        outside the API's keys move the revision past that, and the compaction at the new revision then
        passes every position the stopped server could have handed out.
        """
        for _ in range(2):
            key = base64.b64encode(b"/devcluster/revision-advance").decode()
            self._etcd_post("/v3/kv/put", {"key": key, "value": base64.b64encode(b"x").decode()})
        return self.compact_etcd()

    def _etcd_post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    # -- internals --------------------------------------------------------------------------------
    def _etcd_argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=devcluster",
            f"--data-dir={self.work_dir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=devcluster={peer}",
            "--unsafe-no-fsync=true",  # a throwaway test store: durability buys nothing, fsync costs seconds
            "--log-level=warn",
        ]

    def _apiserver_argv(self, paths: dict[str, pathlib.Path]) -> list[str]:
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={paths['serving.crt']}",
            f"--tls-private-key-file={paths['serving.key']}",
            f"--client-ca-file={paths['ca.crt']}",
            f"--token-auth-file={self.work_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={paths['sa.pub']}",
            f"--service-account-signing-key-file={paths['sa.key']}",
            "--service-cluster-ip-range=10.96.0.0/16",
            f"--cert-dir={self.work_dir / 'apiserver-certs'}",
            "--allow-privileged=true",
            "--profiling=false",
            "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000",
            "--v=1",
        ]

    def _kcm_argv(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.kcm_port}",
            f"--cert-dir={self.work_dir / 'kcm-certs'}",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--concurrent-service-endpoint-syncs=10",
            "--v=1",
        ]

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "devcluster", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.admin_token}}],
            "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": ADMIN_USER}}],
            "current-context": "devcluster",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def _wait(self, name: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            component = self.components[name]
            if not component.alive():
                raise RuntimeError(f"{name} exited during start-up; its log ends with:\n{component.log_tail()}")
            if probe():
                return
            time.sleep(0.2)  # poll: start-up has no event to wait on
        raise TimeoutError(
            f"{name} not ready after {timeout:.0f}s; its log ends with:\n{self.components[name].log_tail()}"
        )

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _https_ok(self, url: str, context: ssl.SSLContext, token: str | None = None) -> bool:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _apiserver_ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return self._https_ok(self.server + "/readyz", context, self.admin_token)

    def _kcm_healthy(self) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # its self-signed serving cert; only liveness is probed
        return self._https_ok(f"https://127.0.0.1:{self.kcm_port}/healthz", context)
