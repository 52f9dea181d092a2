"""The local control plane is real and has the behaviour the sidecar depends on.

Each test asserts an observable fact of Kubernetes itself: CRD schema validation, garbage collection
of owned objects, the EndpointSlice controller's readiness, RBAC decisions, and 410 Gone on a watch
resumed from a compacted resourceVersion.
"""

from __future__ import annotations

import json

import pytest

from devcluster.cluster import ControlPlane
from devcluster.objects import ENDPOINT_SLICES, PODS, WORKER_METADATA, Cluster
from devcluster.sidecars import write_token_kubeconfig
from devcluster.waiting import wait_for
from sidecar.kube.api import ApiError, KubeApi

pytestmark = pytest.mark.integration


def worker_metadata(name: str, pod: dict | None = None, data: dict | None = None, with_spec: bool = True) -> dict:
    body: dict = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoWorkerMetadata", "metadata": {"name": name}}
    if pod is not None:
        body["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
        ]
    if with_spec:
        body["spec"] = {"data": data} if data is not None else {}
    return body


def test_versions_are_the_pinned_ones(control_plane: ControlPlane, admin_api: KubeApi) -> None:
    version = admin_api.get("/version")
    assert version["gitVersion"] == "v1.36.3"
    assert version["major"] == "1" and version["minor"].startswith("36")


def test_crd_schema_requires_spec_data(namespace: str, admin_api: KubeApi) -> None:
    path = WORKER_METADATA.collection(namespace)
    with pytest.raises(ApiError) as missing_data:
        admin_api.create(path, worker_metadata("no-data", with_spec=True))
    assert missing_data.value.status == 422
    assert "spec.data" in missing_data.value.message and "Required" in missing_data.value.message
    with pytest.raises(ApiError) as missing_spec:
        admin_api.create(path, worker_metadata("no-spec", with_spec=False))
    assert missing_spec.value.status == 422

    unknown = {"endpoints": {"ns/comp/ep/10dbf5fbb4b0ff": {"transport": "nats"}}, "anything": [1, {"deep": True}]}
    created = admin_api.create(path, worker_metadata("with-data", data=unknown))
    assert created["spec"]["data"] == unknown, "x-kubernetes-preserve-unknown-fields must keep opaque content"


def test_owned_cr_is_garbage_collected_with_its_pod(namespace: str, cluster: Cluster, admin_api: KubeApi) -> None:
    pod = cluster.start_pod(namespace, "gc-worker", {"app": "gc"})
    cr_path = WORKER_METADATA.item(namespace, "gc-worker")
    admin_api.create(WORKER_METADATA.collection(namespace), worker_metadata("gc-worker", pod, {"x": 1}))
    assert cluster.get_or_none(cr_path) is not None
    cluster.delete_pod(namespace, "gc-worker", grace_seconds=0)
    wait_for(lambda: cluster.get_or_none(cr_path) is None, 60, what="the garbage collector to delete the CR")


def test_endpointslice_controller_reports_readiness(namespace: str, cluster: Cluster) -> None:
    cluster.create_service(namespace, "svc", {"app": "es"})
    cluster.start_pod(namespace, "ready-pod", {"app": "es"}, ready=True)
    cluster.start_pod(namespace, "unready-pod", {"app": "es"}, ready=False)
    state = wait_for(
        lambda: (lambda s: s if set(s) == {"ready-pod", "unready-pod"} else None)(
            cluster.ready_pods_in_slices(namespace, "svc")
        ),
        60,
        what="both pods in the EndpointSlices",
    )
    assert state == {"ready-pod": True, "unready-pod": False}
    slices = cluster.endpoint_slices(namespace, "svc")
    targets = {e["targetRef"]["name"]: e["targetRef"]["uid"] for s in slices for e in s.get("endpoints") or ()}
    pod_uid = cluster.api.get(PODS.item(namespace, "ready-pod"))["metadata"]["uid"]
    assert targets["ready-pod"] == pod_uid, "endpoints carry the pod UID the join matches on"

    cluster.set_pod_status(namespace, "unready-pod", ready=True)
    wait_for(
        lambda: cluster.ready_pods_in_slices(namespace, "svc") == {"ready-pod": True, "unready-pod": True},
        60,
        what="the second pod to turn ready",
    )


def test_rbac_refuses_without_role_and_allows_with_it(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, tmp_path
) -> None:
    cluster.create_service_account(namespace, "no-role")
    pod = cluster.create_pod(namespace, "rbac-pod", {"app": "rbac"}, service_account="no-role")
    token = cluster.pod_bound_token(namespace, "no-role", pod)
    without = KubeApi.from_kubeconfig(
        str(write_token_kubeconfig(control_plane, token, tmp_path / "no-role.kubeconfig"))
    )
    with pytest.raises(ApiError) as refused:
        without.get(ENDPOINT_SLICES.collection(namespace))
    assert refused.value.status == 403
    assert "system:serviceaccount:" + namespace + ":no-role" in refused.value.message

    cluster.bind_role(namespace, "no-role", "discovery-sidecar", binding="no-role-now-has-role")
    listing = wait_for(
        lambda: _try_list(without, ENDPOINT_SLICES.collection(namespace)), 30, what="RBAC to admit the bound SA"
    )
    assert listing["kind"] == "EndpointSliceList"
    without.close()


def _try_list(api: KubeApi, path: str) -> dict | None:
    try:
        return api.get(path)
    except ApiError as exc:
        if exc.status == 403:
            return None
        raise


def test_watch_from_compacted_resource_version_gets_410(
    outage_control_plane: ControlPlane, namespace: str, admin_api: KubeApi
) -> None:
    control_plane = outage_control_plane
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    first = admin_api.create(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}})
    old_rv = first["metadata"]["resourceVersion"]
    for i in range(5):
        admin_api.merge_patch(f"{path}/c", {"data": {"i": str(i)}})
    control_plane.compact_etcd()
    control_plane.restart_apiserver()  # its watch cache now starts after the compaction
    try:
        stream = admin_api.stream(path, [("watch", "1"), ("resourceVersion", old_rv)], read_timeout=30)
    except ApiError as exc:  # the server may refuse the watch request itself
        assert exc.status == 410, exc
        return
    try:
        event = next(iter(stream))
    finally:
        stream.close()
    assert event["type"] == "ERROR", json.dumps(event)
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] in ("Expired", "Gone")
