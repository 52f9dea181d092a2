"""Playing the kubelet: create Nodes, Services and Pods, and drive pod status by hand.

With no kubelet, a pod stays Pending with no IP forever. Tests and the demo patch ``status`` (phase,
IP, the Ready condition) themselves, which is exactly the input the EndpointSlice controller reads.
Pods are bound to a Node at creation (``spec.nodeName``), as the scheduler would.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from devcluster.waiting import wait_for
from sidecar.kube import sources
from sidecar.kube.api import ApiError, KubeApi, ResourcePath

PODS = ResourcePath("", "v1", "pods")
SERVICES = ResourcePath("", "v1", "services")
SERVICE_ACCOUNTS = ResourcePath("", "v1", "serviceaccounts")
# Where the sidecar's sources live, from its one table (tests write these objects directly).
ENDPOINT_SLICES = sources.ENDPOINT_SLICES.resource
WORKER_METADATA = sources.WORKER_METADATA.resource

T = TypeVar("T")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_ip_counter = itertools.count(1)


def next_pod_ip() -> str:
    """A fresh address in 10.244.0.0/16 (never routed: nothing ever dials these)."""
    return str(ipaddress.ip_address("10.244.0.0") + next(_ip_counter))


class Cluster:
    """Object helpers over a ``KubeApi`` with admin rights."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    # -- namespaces and nodes ----------------------------------------------------------------------
    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}
        return self.api.create("/api/v1/namespaces", body)

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace, its pods first at once: no kubelet confirms their termination, so with their grace
        period they would stay Terminating, and the namespace with them, its controller retrying for good."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
        try:
            self.api.delete(PODS.collection(name), body)
            self.api.delete(f"/api/v1/namespaces/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    def wait_for_service_account(self, namespace: str, name: str = "default", timeout: float = 30.0) -> None:
        def exists() -> bool:
            try:
                self.api.get(SERVICE_ACCOUNTS.item(namespace, name))
                return True
            except ApiError as exc:
                if exc.status == 404:
                    return False
                raise

        wait_for(exists, timeout, what=f"service account {namespace}/{name}")

    def ensure_node(self, name: str = "node-a", zone: str = "zone-a") -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name}},
        }
        try:
            return self.api.create("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return self.api.get(f"/api/v1/nodes/{name}")

    # -- services --------------------------------------------------------------------------------
    def create_service(
        self,
        namespace: str,
        name: str,
        selector: Mapping[str, str],
        port: int = 8000,
        headless: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "selector": dict(selector),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        }
        if headless:
            spec["clusterIP"] = "None"
        body = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": spec,
        }
        return self.api.create(SERVICES.collection(namespace), body)

    # -- pods --------------------------------------------------------------------------------------
    def create_pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        node: str = "node-a",
        port: int = 8000,
        service_account: str = "discovery-sidecar",
        containers: Sequence[str] = ("main",),
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A pod bound to ``node``; by default under the sidecar's service account (manifests/rbac.yaml).

        ``containers`` names its containers (the first serves ``port``), for Dynamo's container mode."""
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels), "annotations": dict(annotations or {})},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "automountServiceAccountToken": False,
                "containers": [
                    {"name": c, "image": "example.invalid/worker:1"}
                    | ({"ports": [{"containerPort": port, "name": "http"}]} if i == 0 else {})
                    for i, c in enumerate(containers)
                ],
            },
        }
        return self.api.create(PODS.collection(namespace), body)

    def set_pod_status(
        self,
        namespace: str,
        name: str,
        ready: bool,
        ip: str | None = None,
        containers_ready: Mapping[str, bool] | None = None,
    ) -> dict[str, Any]:
        """Patch the status a kubelet would report: Running, an IP, and the Ready condition.

        Every container is as ready as the pod unless ``containers_ready`` says otherwise for it (the pod is
        then Ready only when all its containers are, as the kubelet reports it)."""
        pod_for_containers = self.api.get(PODS.item(namespace, name))
        per_container = {c["name"]: ready for c in pod_for_containers["spec"]["containers"]}
        per_container.update(containers_ready or {})
        ready = ready and all(per_container.values())
        pod = pod_for_containers
        ip = ip or (pod.get("status") or {}).get("podIP") or next_pod_ip()
        state = "True" if ready else "False"
        now = _now()
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.1",
            "startTime": (pod.get("status") or {}).get("startTime") or now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": state, "lastTransitionTime": now},
                {"type": "Ready", "status": state, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "ready": per_container[c["name"]],
                    "started": True,
                    "restartCount": 0,
                    "image": c["image"],
                    "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }
                for c in pod["spec"]["containers"]
            ],
        }
        return self.api.request(
            "PATCH",
            PODS.item(namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def start_pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        ready: bool = True,
        ip: str | None = None,
        service_account: str = "discovery-sidecar",
        containers: Sequence[str] = ("main",),
        annotations: Mapping[str, str] | None = None,
        port: int = 8000,
    ) -> dict[str, Any]:
        """Create a pod and report it Running (and Ready unless told otherwise)."""
        self.create_pod(
            namespace,
            name,
            labels,
            port=port,
            service_account=service_account,
            containers=containers,
            annotations=annotations,
        )
        return self.set_pod_status(namespace, name, ready=ready, ip=ip)

    def relabel_pod(self, namespace: str, name: str, labels: Mapping[str, str | None]) -> dict[str, Any]:
        return self.api.merge_patch(PODS.item(namespace, name), {"metadata": {"labels": dict(labels)}})

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> dict[str, Any]:
        return self.api.merge_patch(PODS.item(namespace, name), {"metadata": {"annotations": dict(annotations)}})

    def delete_pod(self, namespace: str, name: str, grace_seconds: int = 0) -> None:
        """Delete a pod; grace 0 removes it at once (there is no kubelet to confirm termination)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace_seconds}
        try:
            self.api.delete(PODS.item(namespace, name), body)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self.api.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def endpoint_slices(self, namespace: str, service: str) -> list[dict[str, Any]]:
        reply = self.api.get(
            ENDPOINT_SLICES.collection(namespace), [("labelSelector", f"kubernetes.io/service-name={service}")]
        )
        return reply.get("items", [])

    def ready_pods_in_slices(self, namespace: str, service: str) -> dict[str, bool]:
        """pod name -> ready, as the EndpointSlice controller currently publishes them."""
        result: dict[str, bool] = {}
        for item in self.endpoint_slices(namespace, service):
            for endpoint in item.get("endpoints") or ():
                name = (endpoint.get("targetRef") or {}).get("name")
                if name:
                    ready = (endpoint.get("conditions") or {}).get("ready")
                    result[name] = result.get(name, False) or ready is not False
        return result

    # -- DynamoWorkerMetadata written the way Dynamo's own runtime writes it ---------------------------
    def register_like_dynamo(
        self, pod: Mapping[str, Any], data: Mapping[str, Any] | None = None, field_manager: str = "dynamo"
    ) -> dict[str, Any]:
        """Server-side apply of the pod's CR, owned by the pod (controller true), as Dynamo 1.6.1 does."""
        meta = pod["metadata"]
        body = {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoWorkerMetadata",
            "metadata": {
                "name": meta["name"],
                "labels": dict(meta.get("labels") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "spec": {
                "data": dict(data) if data is not None else {"endpoints": {}, "model_cards": {}, "event_channels": {}}
            },
        }
        return self.api.apply(WORKER_METADATA.item(meta["namespace"], meta["name"]), body, field_manager)

    # -- RBAC and tokens ---------------------------------------------------------------------------
    def bind_role(self, namespace: str, service_account: str, role: str, binding: str | None = None) -> dict[str, Any]:
        """A RoleBinding of ``role`` to ``service_account`` (named ``binding``, default the account's name)."""
        return self.api.create(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": binding or service_account},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
            },
        )

    def create_service_account(self, namespace: str, name: str) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
        return self.api.create(SERVICE_ACCOUNTS.collection(namespace), body)

    def pod_bound_token(self, namespace: str, service_account: str, pod: Mapping[str, Any], seconds: int = 3600) -> str:
        """A real pod-bound token from the TokenRequest API, as the kubelet would mount it."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": ["https://kubernetes.default.svc"],
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        reply = self.api.create(SERVICE_ACCOUNTS.item(namespace, service_account) + "/token", body)
        return reply["status"]["token"]
