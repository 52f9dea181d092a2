"""A Deployment rolls out on kwok's simulated nodes as on a real cluster (issue #23, item 5).

The real Deployment and ReplicaSet controllers make the pods, the scheduler stand-in binds them to
kwok nodes, kwok plays their kubelets (``devcluster/kwok_stages.yaml``), and the real EndpointSlice
controller publishes them: every assertion is on objects the API server holds or sent on a watch.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from devcluster.kwok import POD_NETWORK, SCHEDULER, Kwok, pod_template_spec
from devcluster.objects import ENDPOINT_SLICES, PODS, Cluster
from devcluster.waiting import wait_for
from devcluster.watching import CollectionWatch
from sidecar.kube.api import ApiError, KubeApi
from tests.conftest import kubectl

pytestmark = pytest.mark.integration

APP = "web"
REPLICAS = 4


def _deployment() -> dict[str, Any]:
    labels = {"app": APP}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    # kwok's delays for these pods: quick, but a terminating pod lingers long enough (3 s, within
                    # its 5 s grace) for the EndpointSlice controller to publish it as terminating first, even
                    # after one of its 1 s retries.
                    "annotations": {"devcluster.kwok/ready": "300ms", "devcluster.kwok/stop": "3s"},
                },
                "spec": pod_template_spec(
                    terminationGracePeriodSeconds=5,
                    automountServiceAccountToken=False,
                    containers=[
                        {
                            "name": "main",
                            "image": "example.invalid/web:1",
                            "ports": [{"name": "http", "containerPort": 8000}],
                        }
                    ],
                ),
            },
        },
    }


def _pods(api: KubeApi, namespace: str) -> list[dict[str, Any]]:
    return api.get(PODS.collection(namespace), [("labelSelector", f"app={APP}")])["items"]


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or ()}
    return conditions.get("Ready") == "True"


def _published(cluster: Cluster, namespace: str) -> dict[str, tuple[str, bool]]:
    """pod name -> (address, ready) as the EndpointSlice controller publishes the Service."""
    found = {}
    for item in cluster.endpoint_slices(namespace, APP):
        for endpoint in item.get("endpoints") or ():
            name = endpoint["targetRef"]["name"]
            found[name] = (endpoint["addresses"][0], bool(endpoint["conditions"].get("ready")))
    return found


def _settled(api: KubeApi, cluster: Cluster, namespace: str) -> dict[str, str] | None:
    """When exactly REPLICAS pods exist, all Ready with an IP, not deleting, and the Service's slices list
    exactly them as ready at those IPs: pod name -> UID."""
    pods = _pods(api, namespace)
    if len(pods) != REPLICAS or not all(_ready(p) and not p["metadata"].get("deletionTimestamp") for p in pods):
        return None
    expected = {p["metadata"]["name"]: (p["status"]["podIP"], True) for p in pods}
    if _published(cluster, namespace) != expected:
        return None
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


def test_a_deployment_rolls_out_through_kwok(
    control_plane: ControlPlane, kwok: Kwok, admin_api: KubeApi, cluster: Cluster, namespace: str
) -> None:
    cluster.create_service(namespace, APP, {"app": APP}, headless=False)
    admin_api.create(f"/apis/apps/v1/namespaces/{namespace}/deployments", _deployment())

    first = wait_for(
        lambda: _settled(admin_api, cluster, namespace), 90, interval=0.2, what="4 Ready pods in the slices"
    )
    pods = _pods(admin_api, namespace)
    assert {p["spec"]["schedulerName"] for p in pods} == {SCHEDULER}
    assert {p["spec"]["nodeName"] for p in pods} == set(kwok.nodes), "bound round-robin over both kwok nodes"
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_NETWORK
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "ReplicaSet" and owner["controller"] is True
    assert len({p["status"]["podIP"] for p in pods}) == REPLICAS, "every pod has an address of its own"

    # Watch the slices through the rollout: an old pod must be seen terminating before it goes.
    seen: list[tuple[str, bool, bool]] = []  # (pod name, ready, terminating) of every endpoint in every event
    lock = threading.Lock()

    def record(_: str, item: Mapping[str, Any]) -> None:
        with lock:
            for endpoint in item.get("endpoints") or ():
                conditions = endpoint.get("conditions") or {}
                seen.append(
                    (endpoint["targetRef"]["name"], bool(conditions.get("ready")), bool(conditions.get("terminating")))
                )

    watch = CollectionWatch(
        admin_api, ENDPOINT_SLICES.collection(namespace), record, label_selector=f"kubernetes.io/service-name={APP}"
    ).start()
    try:
        wait_for(watch.synced.is_set, 30, what="the slice watch")
        kubectl(control_plane, "rollout", "restart", f"deployment/{APP}", namespace=namespace)
        kubectl(control_plane, "rollout", "status", f"deployment/{APP}", "--timeout=120s", namespace=namespace)
        second = wait_for(
            lambda: (found := _settled(admin_api, cluster, namespace)) and not set(found) & set(first) and found,
            90,
            interval=0.2,
            what="4 new Ready pods in the slices, every old pod gone",
        )
    finally:
        watch.stop()

    assert not set(second.values()) & set(first.values()), "every pod was replaced by a new incarnation"
    with lock:
        terminating_old = {name for name, ready, terminating in seen if terminating and not ready and name in first}
        ready_new = {name for name, ready, _ in seen if ready and name in second}
    assert terminating_old, "no old pod was published as terminating before it was removed"
    assert ready_new == set(second)


def test_kwok_nodes_are_ready_with_leases(kwok: Kwok, admin_api: KubeApi) -> None:
    for name in kwok.nodes:
        node = admin_api.get(f"/api/v1/nodes/{name}")
        conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert {a["type"] for a in node["status"]["addresses"]} == {"InternalIP", "Hostname"}
        lease = wait_for(
            lambda name=name: node_lease(admin_api, name), 60, interval=0.5, what=f"the node lease of {name}"
        )
        # kwok holds the lease (under its own identity) for the node, renewing it as a kubelet would.
        assert lease["spec"]["holderIdentity"] and lease["spec"]["leaseDurationSeconds"] == 40
        assert lease["spec"]["renewTime"]


def node_lease(api: KubeApi, node: str) -> dict[str, Any] | None:
    try:
        return api.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
