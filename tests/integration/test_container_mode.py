"""Dynamo's container mode (``DYN_KUBE_DISCOVERY_MODE=container``) with the real runtime (1.6.1).

Each container of a pod that registers is an instance of its own: CR ``{pod}-{container}`` (the container
named ``main`` keeps the pod's name and instance ID), readiness from the Pods' ``containerStatuses``,
Pods selected by ``nvidia.com/dynamo-discovery-enabled=true``. Shown here, both directions:

* two Dynamo workers in one pod (containers ``main`` and ``engine``) are two peers of a container-mode
  sidecar, with Dynamo's instance IDs; one container turning unready removes only its peer, and deleting
  the pod removes both, for the sidecar and for a container-mode Dynamo client alike;
* a sidecar registering container ``engine`` of its pod writes ``{pod}-engine`` with that name's instance
  ID, and a Dynamo client lists it;
* the admission policy for container mode admits ``{pod}-{container}`` names and still refuses another
  pod's, and the strict default policy refuses them (which is what 1.6.1's engine container meets).

The namespace gets the Pods Role (``manifests/components/pod-discovery/rbac-pod-discovery.yaml``); the container-mode
admission policy replaces the strict one for the test and the strict one is put back after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from devcluster.dynamo import DynamoProcess, DynamoProcesses
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.sidecars import write_token_kubeconfig
from devcluster.waiting import wait_for
from discovery_client.client import DiscoveryClient, make_filter
from sidecar.core.instance_id import instance_id
from sidecar.kube.api import ApiError, KubeApi
from tests.conftest import MANIFESTS, POD_DISCOVERY_RBAC, Sidecars, kubectl
from tests.integration.streams import StreamRecorder
from tests.integration.test_dynamo_interop import ENDPOINT, dynamo_metadata

pytestmark = pytest.mark.integration

DISCOVERABLE = {"app": "cm", "nvidia.com/dynamo-discovery-enabled": "true"}
CONTAINER_MODE = {"DYN_KUBE_DISCOVERY_MODE": "container"}
TIMEOUT = 45.0
STRICT_POLICY = MANIFESTS / "admission-policy.yaml"
CONTAINER_POLICY = MANIFESTS / "components" / "container-mode" / "admission-policy-container-mode.yaml"


def cr_body(name: str, pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    return {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoWorkerMetadata",
        "metadata": {
            "name": name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}],
        },
        "spec": {"data": {}},
    }


def pod_api(plane: ControlPlane, cluster: Cluster, pod: dict[str, Any], path: Any) -> KubeApi:
    token = cluster.pod_bound_token(pod["metadata"]["namespace"], "discovery-sidecar", pod)
    return KubeApi.from_kubeconfig(str(write_token_kubeconfig(plane, token, path)))


def may_write(api: KubeApi, namespace: str, name: str, pod: dict[str, Any]) -> bool | None:
    """Whether the policy admits the pod's write of CR ``name`` (a dry run); None while unsure."""
    try:
        api.request("POST", WORKER_METADATA.collection(namespace), [("dryRun", "All")], body=cr_body(name, pod))
        return True
    except ApiError as exc:
        return False if exc.status == 403 else None


@pytest.fixture
def container_mode(control_plane: ControlPlane, namespace: str, cluster: Cluster, tmp_path: Any) -> Iterator[str]:
    """The namespace ready for container mode: the Pods Role, and the container-mode admission policy in force."""
    kubectl(control_plane, "apply", "-f", str(POD_DISCOVERY_RBAC), namespace=namespace)
    probe = cluster.start_pod(namespace, "probe", {"app": "probe"})
    api = pod_api(control_plane, cluster, probe, tmp_path / "probe.kubeconfig")
    try:
        assert may_write(api, namespace, "probe-engine", probe) is False, "the strict policy refuses {pod}-{container}"
        kubectl(control_plane, "apply", "-f", str(CONTAINER_POLICY))
        # Admission policies reach the API server through its informer: wait until the new one is in force.
        wait_for(lambda: may_write(api, namespace, "probe-engine", probe), TIMEOUT, what="the container-mode policy")
        assert may_write(api, namespace, "other-engine", probe) is False, "another pod's names are still refused"
        assert may_write(api, namespace, "probe", probe) is True
        yield namespace
    finally:
        kubectl(control_plane, "apply", "-f", str(STRICT_POLICY))
        wait_for(
            lambda: may_write(api, namespace, "probe-engine", probe) is False, TIMEOUT, what="the strict policy back"
        )
        api.close()


@pytest.fixture
def dynamo(control_plane: ControlPlane, cluster: Cluster, tmp_path: Any) -> Iterator[DynamoProcesses]:
    manager = DynamoProcesses(control_plane, cluster, tmp_path / "dynamo")
    yield manager
    manager.stop_all()


def dynamo_in(dynamo: DynamoProcesses, pod: dict[str, Any], container: str, mode: str = "worker") -> DynamoProcess:
    env = {**CONTAINER_MODE, "CONTAINER_NAME": container}
    if mode == "client":
        return dynamo.client(pod, endpoint=ENDPOINT, extra_env=env)
    return dynamo.worker(pod, endpoint=ENDPOINT, extra_env=env)


def test_dynamo_containers_are_peers_of_a_container_mode_sidecar(
    container_mode: str, cluster: Cluster, sidecars: Sidecars, dynamo: DynamoProcesses
) -> None:
    ns = container_mode
    worker = cluster.start_pod(ns, "w0", DISCOVERABLE, containers=("main", "engine"))
    main = dynamo_in(dynamo, worker, "main")
    engine = dynamo_in(dynamo, worker, "engine")
    for process in (main, engine):
        process.wait_event("serving")
    assert main.instance_id == instance_id("w0"), "1.6.1: the container named main keeps the pod's identity"
    assert engine.instance_id == instance_id("w0-engine")
    wait_for(
        lambda: (
            {cr["metadata"]["name"] for cr in cluster.api.get(WORKER_METADATA.collection(ns))["items"]}
            == {"w0", "w0-engine"}
        ),
        TIMEOUT,
        what="Dynamo's CRs w0 (main) and w0-engine",
    )

    frontend = cluster.start_pod(ns, "fe", DISCOVERABLE, containers=("main", "discovery"))
    client = dynamo_in(dynamo, frontend, "main", mode="client")
    observer = sidecars.start(frontend, "", extra_env={**CONTAINER_MODE, "CONTAINER_NAME": "main"}).wait_ready()
    stream = StreamRecorder(observer.target, make_filter(endpoint=ENDPOINT))
    try:
        ids = {main.instance_id, engine.instance_id}
        client.wait_instance_ids(lambda seen: seen == ids, TIMEOUT, "both containers of w0")
        stream.wait_until(lambda r: set(r.names()) == {"w0", "w0-engine"}, TIMEOUT, "both containers as peers")
        peers = stream.peers()
        uid = worker["metadata"]["uid"]
        assert (peers["w0"].uid, peers["w0"].container, peers["w0"].instance_id) == (uid, "main", main.instance_id)
        assert (peers["w0-engine"].uid, peers["w0-engine"].container, peers["w0-engine"].instance_id) == (
            f"{uid}/engine",
            "engine",
            engine.instance_id,
        )
        assert [e.instance_id for e in peers["w0-engine"].endpoints] == [engine.instance_id]

        cluster.set_pod_status(ns, "w0", ready=True, containers_ready={"engine": False})
        client.wait_instance_ids(lambda seen: seen == {main.instance_id}, TIMEOUT, "only w0's main container")
        stream.wait_until(lambda r: set(r.names()) == {"w0"}, TIMEOUT, "only the main container a peer")
        cluster.set_pod_status(ns, "w0", ready=True)
        client.wait_instance_ids(lambda seen: seen == ids, TIMEOUT, "both again")
        stream.wait_until(lambda r: set(r.names()) == {"w0", "w0-engine"}, TIMEOUT, "both peers again")

        cluster.delete_pod(ns, "w0", grace_seconds=0)  # no process stops first: the deletion itself is seen
        client.wait_instance_ids(lambda seen: not seen, TIMEOUT, "nothing once w0 is deleted")
        stream.wait_until(lambda r: not r.names(), TIMEOUT, "no peers once w0 is deleted")
    finally:
        stream.close()


def test_a_container_mode_sidecar_registers_its_container_for_dynamo(
    container_mode: str, cluster: Cluster, sidecars: Sidecars, dynamo: DynamoProcesses
) -> None:
    ns = container_mode
    pod = cluster.start_pod(ns, "w1", DISCOVERABLE, containers=("main", "engine"))
    sidecar = sidecars.start(pod, "", extra_env={**CONTAINER_MODE, "CONTAINER_NAME": "engine"}).wait_ready()
    with DiscoveryClient(sidecar.target) as client:
        me = client.get_self()
        assert (me.name, me.uid) == ("w1-engine", f"{pod['metadata']['uid']}/engine")
        assert me.instance_id == instance_id("w1-engine")
        client.publish_metadata(dynamo_metadata(ENDPOINT, me.instance_id, f"{pod['status']['podIP']}:8000"))
    cr = cluster.get_or_none(WORKER_METADATA.item(ns, "w1-engine"))
    assert cr is not None and cr["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    assert cluster.get_or_none(WORKER_METADATA.item(ns, "w1")) is None, "the pod's own name is the main container's"

    frontend = cluster.start_pod(ns, "fe", DISCOVERABLE)
    client_process = dynamo_in(dynamo, frontend, "main", mode="client")
    client_process.wait_instance_ids(lambda seen: me.instance_id in seen, TIMEOUT, "the sidecar's container")
    cluster.set_pod_status(ns, "w1", ready=True, containers_ready={"engine": False})
    client_process.wait_instance_ids(lambda seen: me.instance_id not in seen, TIMEOUT, "gone once engine is unready")
