"""DISCOVERY_NAMESPACES=* on the real API server: the ClusterRole manifests make it work, and grant no more.

Each mode has its own ClusterRole (manifests/optional): EndpointSlices or Pods as readiness, with
peers' metadata, list and watch only. Without it the sidecar's cluster-wide watch is refused (403,
``/readyz`` says so); with it, peers of every namespace appear. The authorizer is then asked what the
ServiceAccount may do: nothing it was not given.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from devcluster.cluster import ControlPlane
from devcluster.objects import Cluster
from devcluster.waiting import wait_for
from tests.conftest import MANIFESTS, POD_DISCOVERY_RBAC, Sidecars, kubectl
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration
READY = "PEER_STATE_READY"
PODS_FILE = MANIFESTS / "optional" / "rbac-pod-discovery-all-namespaces.yaml"
SLICES_FILE = MANIFESTS / "optional" / "rbac-all-namespaces.yaml"


@pytest.fixture
def other_namespace(cluster: Cluster, namespace: str) -> Iterator[str]:
    name = f"{namespace[:40]}-other"
    cluster.create_namespace(name)
    cluster.wait_for_service_account(name)  # workers there run no sidecar: the default ServiceAccount
    yield name
    cluster.delete_namespace(name)


def apply_cluster_role(plane: ControlPlane, source: pathlib.Path, namespace: str, tmp_path: pathlib.Path) -> str:
    """The manifest as an operator applies it: with its subject's namespace set to the sidecar's."""
    text = source.read_text()
    assert "namespace: inference" in text, "the placeholder the manifest's comment tells operators to replace"
    target = tmp_path / source.name
    target.write_text(text.replace("namespace: inference", f"namespace: {namespace}"))
    kubectl(plane, "apply", "-f", str(target))
    return str(target)


def can(plane: ControlPlane, namespace: str, *args: str) -> bool:
    out = kubectl(
        plane, "auth", "can-i", *args, f"--as=system:serviceaccount:{namespace}:discovery-sidecar", check=False
    )
    return out.strip().splitlines()[0] == "yes"


@pytest.mark.parametrize("mode", ["pods", "endpointslices"])
def test_cluster_role_makes_all_namespaces_work_and_grants_no_more(
    mode: str,
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    other_namespace: str,
    sidecars: Sidecars,
    tmp_path: pathlib.Path,
) -> None:
    if mode == "pods":
        kubectl(control_plane, "apply", "-f", str(POD_DISCOVERY_RBAC), namespace=namespace)
        env = {"DISCOVERY_SERVICE_NAME": "", "DISCOVERY_POD_SELECTOR": "app=w", "DISCOVERY_REQUIRE_METADATA": "false"}
        source = PODS_FILE
    else:
        for ns in (namespace, other_namespace):
            cluster.create_service(ns, "w", {"app": "w"})
        env = {"DISCOVERY_SERVICE_NAME": "w"}
        source = SLICES_FILE
    observer = sidecars.start(
        cluster.start_pod(namespace, "observer", {"app": "observer"}),
        "w",
        extra_env={**env, "DISCOVERY_NAMESPACES": "*", "DISCOVERY_WATCH": "always"},  # watching without a client
    )
    wait_for(lambda: "403" in observer.http_get("/readyz")[1], 60, what="the cluster-wide watch refused (403)")

    applied = apply_cluster_role(control_plane, source, namespace, tmp_path)
    try:
        observer.wait_ready(60)
        for ns, name in ((namespace, "w-here"), (other_namespace, "w-there")):
            # pod-label discovery takes loopback pod IPs; the EndpointSlice controller needs routable ones
            ip = {"w-here": "127.0.0.41", "w-there": "127.0.0.42"}[name] if mode == "pods" else None
            account = "discovery-sidecar" if ns == namespace else "default"
            pod = cluster.start_pod(ns, name, {"app": "w"}, ip=ip, service_account=account)
            if mode == "endpointslices":
                cluster.register_like_dynamo(pod)
        stream = StreamRecorder(observer.target)
        try:
            stream.wait_until(lambda r: r.names() == {"w-here": READY, "w-there": READY}, 60, "both namespaces")
            assert {p.namespace for p in stream.peers().values()} == {namespace, other_namespace}
        finally:
            stream.close()

        readiness = ("pods", "") if mode == "pods" else ("endpointslices.discovery.k8s.io", "")
        assert can(control_plane, namespace, "list", readiness[0], "--all-namespaces")
        assert can(control_plane, namespace, "watch", "dynamoworkermetadatas.nvidia.com", "--all-namespaces")
        other = "endpointslices.discovery.k8s.io" if mode == "pods" else "pods"
        assert not can(control_plane, namespace, "list", other, "--all-namespaces"), "the other mode's reads"
        assert not can(control_plane, namespace, "get", "pods", "-n", other_namespace), "no get elsewhere"
        assert not can(control_plane, namespace, "create", "dynamoworkermetadatas.nvidia.com", "-n", other_namespace)
        assert not can(control_plane, namespace, "list", "secrets", "--all-namespaces")
    finally:
        kubectl(control_plane, "delete", "-f", applied, check=False)
