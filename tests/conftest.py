"""Fixtures: one real control plane per test session, a fresh namespace per test.

The control plane (etcd, kube-apiserver, kube-controller-manager) is built from pinned Go modules on
first use (cached in ~/.cache) and torn down at the end of the session; its processes are tied to
this one with PR_SET_PDEATHSIG, so an interrupted run leaves nothing behind. Nothing here skips: a
machine that cannot build or start the control plane fails the integration tests loudly.
"""

from __future__ import annotations

import itertools
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from devcluster.build import ROOT, ensure_built
from devcluster.cluster import ControlPlane
from devcluster.etcd import EtcdServer
from devcluster.kwok import Kwok
from devcluster.objects import Cluster
from devcluster.relays import RelayProcess, RelayTls, launch_relay, make_relay_tls
from devcluster.sidecars import SidecarProcess, launch_sidecar
from devcluster.sockets import short_socket_dir
from sidecar.kube.api import KubeApi

MANIFESTS = ROOT / "manifests"
CRD_FILE = MANIFESTS / "components" / "crd" / "crd.yaml"
POD_DISCOVERY_RBAC = MANIFESTS / "components" / "pod-discovery" / "rbac-pod-discovery.yaml"
_namespace_counter = itertools.count()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    bin_dir = ensure_built()
    plane = ControlPlane(bin_dir=bin_dir, work_dir=tmp_path_factory.mktemp("controlplane"))
    plane.start()
    try:
        kubectl(plane, "apply", "-f", str(CRD_FILE))
        kubectl(plane, "wait", "--for=condition=Established", "crd/dynamoworkermetadatas.nvidia.com", "--timeout=60s")
        kubectl(plane, "apply", "-f", str(MANIFESTS / "admission-policy.yaml"))
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def outage_control_plane(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The session's control plane for a test that takes its API server away; put back whole afterwards.

    The API server is started again if the test stopped short, and kube-controller-manager is restarted
    (``ControlPlane.restart_controller_manager``): the one that lived through the outage can take a minute
    to publish new endpoints, which the next test would see as its own failure.
    """
    yield control_plane
    if not control_plane.components["kube-apiserver"].alive():
        control_plane.start_apiserver()
    control_plane.restart_controller_manager()


def kubectl(plane: ControlPlane, *args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}"]
    if namespace:
        argv.append(f"--namespace={namespace}")
    result = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def admin_api(control_plane: ControlPlane) -> Iterator[KubeApi]:
    api = KubeApi.from_kubeconfig(str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def cluster(admin_api: KubeApi) -> Cluster:
    c = Cluster(admin_api)
    c.ensure_node("node-a", "zone-a")
    return c


@pytest.fixture(scope="session")
def kwok(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kwok]:
    """kwok's simulated kubelets and the scheduler stand-in on the session's plane, with two nodes.

    Only pods with ``schedulerName: kwok`` land on them (``devcluster.kwok``); every other test's pods
    and ``node-a`` are left as they are. Built (a few minutes, once) and started only when asked for."""
    simulated = Kwok(control_plane, tmp_path_factory.mktemp("kwok"))
    simulated.start()
    try:
        simulated.add_nodes(2, zones=2)
        yield simulated
    finally:
        simulated.stop()


@pytest.fixture
def socket_dir() -> Iterator[pathlib.Path]:
    """A short directory for Unix sockets: ``tmp_path`` can make a socket path longer than the kernel allows
    (``devcluster.sockets``)."""
    path = short_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def namespace(control_plane: ControlPlane, cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace with the sidecar's ServiceAccount, Role and RoleBinding (manifests/rbac.yaml)."""
    base = request.node.name.lower().replace("_", "-")
    name = f"t{next(_namespace_counter)}-{''.join(c for c in base if c.isalnum() or c == '-')}"[:50].rstrip("-")
    cluster.create_namespace(name)
    kubectl(control_plane, "apply", "-f", str(MANIFESTS / "rbac.yaml"), namespace=name)
    cluster.wait_for_service_account(name, "discovery-sidecar")
    yield name
    cluster.delete_namespace(name)


class Sidecars:
    """Starts sidecar processes for a test and always stops them."""

    def __init__(self, plane: ControlPlane, cluster: Cluster, work_dir: pathlib.Path) -> None:
        self.plane = plane
        self.cluster = cluster
        self.work_dir = work_dir
        self.running: list[SidecarProcess] = []

    def start(self, pod: dict, service: str, **kwargs: object) -> SidecarProcess:
        process = launch_sidecar(self.plane, self.cluster, pod, service, self.work_dir, **kwargs)  # type: ignore[arg-type]
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.running:
            try:
                process.terminate(timeout=15)
            except Exception:  # noqa: BLE001 - teardown must reach every process
                process.kill()


@pytest.fixture
def sidecars(control_plane: ControlPlane, cluster: Cluster, tmp_path: pathlib.Path) -> Iterator[Sidecars]:
    manager = Sidecars(control_plane, cluster, tmp_path / "sidecars")
    yield manager
    manager.stop_all()


@pytest.fixture(scope="session")
def etcd_bin() -> pathlib.Path:
    """The directory of the etcd binary the project builds (the control plane's)."""
    return ensure_built()


@pytest.fixture
def etcd(etcd_bin: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[EtcdServer]:
    """A real etcd of its own for one test (the etcd backend's tests), always stopped."""
    server = EtcdServer(tmp_path / "etcd", bin_dir=etcd_bin)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def relay_tls(tmp_path_factory: pytest.TempPathFactory) -> RelayTls:
    """A relay's key pair and the CA that verifies it, made once per session (devcluster.pki)."""
    return make_relay_tls(tmp_path_factory.mktemp("relay-tls"))


class Relays:
    """Starts relay processes (``discovery-sidecar relay``) for a test and always stops them."""

    def __init__(self, plane: ControlPlane, tls: RelayTls, work_dir: pathlib.Path) -> None:
        self.plane = plane
        self.tls = tls
        self.work_dir = work_dir
        self.running: list[RelayProcess] = []
        self._count = itertools.count()

    def start(self, settings: dict[str, str], kubeconfig: pathlib.Path | None = None) -> RelayProcess:
        """A relay watching as ``settings`` say (the admin's credentials unless ``kubeconfig``)."""
        relay = launch_relay(
            f"relay-{next(self._count)}", kubeconfig or self.plane.kubeconfig, self.tls, self.work_dir, settings
        )
        self.running.append(relay)
        return relay

    def follow_env(self, *relays: RelayProcess) -> dict[str, str]:
        """What a sidecar needs to follow ``relays``."""
        return {
            "DISCOVERY_UPSTREAM": ",".join(r.address for r in relays),
            "DISCOVERY_UPSTREAM_CA": str(self.tls.ca),
        }

    def stop_all(self) -> None:
        for relay in self.running:
            try:
                relay.terminate(timeout=15)
            except Exception:  # noqa: BLE001 - teardown must reach every process
                relay.kill()


@pytest.fixture
def relays(control_plane: ControlPlane, relay_tls: RelayTls, tmp_path: pathlib.Path) -> Iterator[Relays]:
    manager = Relays(control_plane, relay_tls, tmp_path / "relays")
    yield manager
    manager.stop_all()
