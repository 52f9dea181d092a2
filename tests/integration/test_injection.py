"""Sidecar injection by the MutatingAdmissionPolicy, on the real API server (Kubernetes 1.36, MAP v1).

The policy, its bindings and the parameter object (a SidecarInjection) are the kustomize component
(``manifests/components/injection``, generated from ``sidecar/app/injection/template.yaml``). Pods are created
directly, except a Deployment's, which the real Deployment and ReplicaSet controllers make (and which stay
Pending: no scheduler places them). A sidecar is then started from the injected spec,
resolved as the kubelet would (``devcluster.sidecars.launch_from_pod``), and shown to register and see
its peers.
"""

from __future__ import annotations

import copy
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devcluster.build import ensure_built
from devcluster.cluster import ControlPlane
from devcluster.injection import wait_until_injecting
from devcluster.objects import PODS, Cluster
from devcluster.relays import launch_relay, make_relay_tls
from devcluster.sidecars import SidecarProcess, launch_from_pod
from devcluster.waiting import wait_for
from discovery_client.client import DiscoveryClient
from sidecar.app.injection import policy
from sidecar.app.injection.pod import inject_pod
from sidecar.app.injection.template import load_template
from sidecar.kube.api import ApiError, KubeApi
from tests.conftest import MANIFESTS, kubectl

pytestmark = pytest.mark.integration

TEMPLATE = load_template()
LABEL = TEMPLATE.label
COMPONENT = MANIFESTS / "components" / "injection" / "injection.yaml"
PARAMS_CRD = MANIFESTS / "components" / "injection" / "sidecarinjections.yaml"
DYNAMO_LABEL = {"nvidia.com/dynamo-discovery-enabled": "true"}  # the default EndpointSlice selector's label


@pytest.fixture(scope="module")
def injection_policy(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[dict[str, Any]]]:
    """The component's cluster-scoped objects (the parameters' CRD, the policy and bindings), for this module only."""
    kubectl(control_plane, "apply", "-f", str(PARAMS_CRD))
    api = KubeApi.from_kubeconfig(str(control_plane.kubeconfig))
    path_ = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{policy.PARAMS_PLURAL}.{policy.PARAMS_GROUP}"
    conditions = lambda: (api.get(path_).get("status") or {}).get("conditions") or ()  # noqa: E731
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in conditions()), 60)
    api.close()
    documents = [d for d in yaml.safe_load_all(COMPONENT.read_text()) if d and d["kind"] != policy.PARAMS_KIND]
    path = tmp_path_factory.mktemp("injection") / "cluster-scoped.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    kubectl(control_plane, "apply", "-f", str(path))
    yield documents
    for document in documents:
        kubectl(control_plane, "delete", document["kind"].lower(), document["metadata"]["name"], check=False)


@pytest.fixture
def injecting(
    control_plane: ControlPlane, injection_policy: list[dict[str, Any]], namespace: str, admin_api: KubeApi
) -> str:
    """``namespace`` with the parameter object (the component's), once the policy is in effect there."""
    (params,) = [d for d in yaml.safe_load_all(COMPONENT.read_text()) if d and d["kind"] == policy.PARAMS_KIND]
    admin_api.create(f"/apis/{policy.PARAMS_API_VERSION}/namespaces/{namespace}/{policy.PARAMS_PLURAL}", params)

    wait_until_injecting(admin_api, namespace)
    return namespace


def pod_body(
    name: str, labels: dict[str, str], annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    body_spec = {
        "nodeName": "node-a",
        "serviceAccountName": "discovery-sidecar",
        "containers": [{"name": "main", "image": "ex/worker:1"}],
    }
    body_spec.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
        "spec": body_spec,
    }


def dry_run_create(api: KubeApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return api.request("POST", PODS.collection(namespace), [("dryRun", "All")], body=body)


def normalised(spec: dict[str, Any]) -> dict[str, Any]:
    """The token volume's random suffix (kube-api-access-xxxxx) made constant, and volumes by name, so two
    admissions compare: the ServiceAccount plugin adds its volume before the policy's (policy) or after
    (inject, which runs before admission); the order of volumes means nothing to a pod."""
    text = yaml.safe_dump(spec)
    result: dict[str, Any] = yaml.safe_load(re.sub(r"kube-api-access-[a-z0-9]{5}", "kube-api-access-x", text))
    result["volumes"] = sorted(result.get("volumes", []), key=lambda v: v["name"])
    return result


def sidecars_in(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for c in [*(spec.get("initContainers") or ()), *spec["containers"]] if c["name"] == TEMPLATE.container_name
    ]


SHAPES = {
    "plain": pod_body("shape", {LABEL: "true"}),
    "annotated": pod_body(
        "shape",
        {LABEL: "true", "role": "decode"},
        {"discovery-sidecar.io/watch": "always", "discovery-sidecar.io/pod-selector": "app=w"},
    ),
    "with-init-env-volumes": pod_body(
        "shape",
        {LABEL: "true"},
        initContainers=[{"name": "setup", "image": "ex/setup:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
        containers=[
            {"name": "main", "image": "ex/worker:1", "env": [{"name": "A", "value": "1"}]},
            {
                "name": "helper",
                "image": "ex/helper:1",
                "env": [{"name": "DISCOVERY_GRPC_LISTEN", "value": "unix:///s"}],
            },
        ],
    ),
    "no-token": pod_body("shape", {LABEL: "true"}, automountServiceAccountToken=False),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_policy_adds_what_inject_adds(injecting: str, admin_api: KubeApi, shape: str) -> None:
    """One template, two ways in: the pod the policy admits equals the pod `discovery-sidecar inject` writes,
    admitted without the label (so without the policy), field for field after the API server's defaults."""
    body = copy.deepcopy(SHAPES[shape])
    by_policy = dry_run_create(admin_api, injecting, body)["spec"]
    assert len(sidecars_in(by_policy)) == 1

    unlabelled = copy.deepcopy(body)
    del unlabelled["metadata"]["labels"][LABEL]
    params = TEMPLATE.default_params()
    by_inject = inject_pod(unlabelled["metadata"], unlabelled["spec"], params, TEMPLATE)
    assert by_inject is not None
    unlabelled["spec"] = by_inject
    admitted = dry_run_create(admin_api, injecting, unlabelled)["spec"]
    if shape != "no-token":
        # inject runs before the ServiceAccount plugin, which then mounts the token into the sidecar too;
        # the policy runs after it and copies the mount. Either way the sidecar ends up with it.
        assert any(
            m["mountPath"] == TEMPLATE.service_account_token_path for m in sidecars_in(by_policy)[0]["volumeMounts"]
        )
    assert normalised(by_policy) == normalised(admitted)


def test_unlabelled_pods_are_untouched(injecting: str, admin_api: KubeApi) -> None:
    body = pod_body("plain", {"app": "w"})
    admitted = dry_run_create(admin_api, injecting, body)["spec"]
    assert sidecars_in(admitted) == [] and "initContainers" not in admitted
    assert all("DISCOVERY_GRPC_LISTEN" not in str(c.get("env")) for c in admitted["containers"])
    assert [v["name"] for v in admitted.get("volumes", [])] == [
        v["name"] for v in admitted.get("volumes", []) if v["name"].startswith("kube-api-access-")
    ]


def test_a_pod_that_declares_the_sidecar_is_left_alone(injecting: str, admin_api: KubeApi) -> None:
    own = {"name": TEMPLATE.container_name, "image": "mine/sidecar:9", "restartPolicy": "Always"}
    body = pod_body("own", {LABEL: "true"}, initContainers=[own])
    admitted = dry_run_create(admin_api, injecting, body)["spec"]
    (sidecar,) = sidecars_in(admitted)
    assert sidecar["image"] == "mine/sidecar:9" and "env" not in sidecar
    assert not any(v["name"].startswith("discovery-") for v in admitted.get("volumes", []))


def test_the_namespace_label_opts_in_and_a_pod_label_false_opts_out(
    injecting: str, admin_api: KubeApi, cluster: Cluster
) -> None:
    """A labelled pod in a labelled namespace opted in both ways: one policy matches it, it gets one sidecar."""
    admin_api.merge_patch(f"/api/v1/namespaces/{injecting}", {"metadata": {"labels": {LABEL: "true"}}})

    def injected_count(labels: dict[str, str]) -> int:
        return len(sidecars_in(dry_run_create(admin_api, injecting, pod_body("ns", labels))["spec"]))

    wait_for(lambda: injected_count({"app": "w"}) == 1, 30, what="the namespace binding to take effect")
    assert injected_count({LABEL: "true"}) == 1, "opted in twice, injected once"
    assert injected_count({LABEL: "false"}) == 0


def test_a_pod_opting_in_where_no_parameters_are_is_refused(
    control_plane: ControlPlane, injection_policy: list[dict[str, Any]], namespace: str, admin_api: KubeApi
) -> None:
    """No parameter object in the namespace (the chart or component was not installed there): the pod is
    refused, naming the binding, rather than started without the discovery its main container expects."""

    def refused() -> str:
        try:
            dry_run_create(admin_api, namespace, pod_body("lonely", {LABEL: "true"}))
        except ApiError as exc:
            return exc.message
        return ""

    message = wait_for(refused, 30, what="the policy to refuse the pod")
    assert policy.policy_name("pods") in message and "no params found" in message, message
    assert not sidecars_in(dry_run_create(admin_api, namespace, pod_body("plain", {"app": "w"}))["spec"])


def test_a_deployments_pods_carry_the_sidecar(control_plane: ControlPlane, injecting: str, admin_api: KubeApi) -> None:
    """The Deployment's template is stored as written (the policy matches Pods); the pods its ReplicaSet
    controller makes from it get the sidecar."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "workers"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "workers"}},
            "template": {
                "metadata": {"labels": {"app": "workers", LABEL: "true"}},
                "spec": {
                    "serviceAccountName": "discovery-sidecar",
                    "containers": [{"name": "main", "image": "ex/w:1"}],
                },
            },
        },
    }
    stored = admin_api.create(f"/apis/apps/v1/namespaces/{injecting}/deployments", deployment)
    assert sidecars_in(stored["spec"]["template"]["spec"]) == []

    def made_by_the_replicaset() -> list[dict[str, Any]]:
        pods = admin_api.get(PODS.collection(injecting), [("labelSelector", "app=workers")])["items"]
        owned = [p for p in pods if [o["kind"] for o in p["metadata"].get("ownerReferences") or ()] == ["ReplicaSet"]]
        return owned if len(owned) == 2 else []

    for pod in wait_for(made_by_the_replicaset, 60, what="the ReplicaSet controller's 2 pods"):
        assert len(sidecars_in(pod["spec"])) == 1, pod["metadata"]["name"]


def test_a_sidecar_started_from_the_injected_spec_registers_and_sees_its_peers(
    control_plane: ControlPlane, cluster: Cluster, injecting: str, admin_api: KubeApi, tmp_path: pathlib.Path
) -> None:
    """The Done-when of injection: labelled pods behind a Service carrying Dynamo's discovery label (the
    default selector); each sidecar runs from its pod's injected container, env and downward-API files
    resolved as the kubelet would; each registers its CR (owned by its pod) and lists the other as a peer."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "workers", "labels": DYNAMO_LABEL},
        "spec": {"clusterIP": "None", "selector": {"app": "workers"}, "ports": [{"name": "http", "port": 8000}]},
    }
    admin_api.create(f"/api/v1/namespaces/{injecting}/services", service)
    processes: list[SidecarProcess] = []
    try:
        for name, role in (("w-0", "prefill"), ("w-1", "decode")):
            created = admin_api.create(
                PODS.collection(injecting),
                pod_body(
                    name,
                    {"app": "workers", "role": role, LABEL: "true"},
                    containers=[
                        {"name": "main", "image": "ex/w:1", "ports": [{"containerPort": 8000, "name": "http"}]}
                    ],
                ),
            )
            assert len(sidecars_in(created["spec"])) == 1
            pod = cluster.set_pod_status(injecting, name, ready=True)
            processes.append(
                launch_from_pod(control_plane, cluster, pod, tmp_path, extra_env={"DISCOVERY_BACKOFF_MAX": "2s"})
            )
        for process in processes:
            process.wait_ready(60)
            record = admin_api.get(
                f"/apis/nvidia.com/v1alpha1/namespaces/{injecting}/dynamoworkermetadatas/{process.name}"
            )
            assert record["metadata"]["ownerReferences"][0]["uid"] == process.pod["metadata"]["uid"]
            # the labels came through the downward-API file the kubelet stand-in wrote from the spec
            assert record["metadata"]["labels"]["role"] in ("prefill", "decode")
        with DiscoveryClient(processes[0].target) as client:

            def peers() -> set[str]:
                return {p.name for p in client.list_peers(timeout=10).peers}

            assert wait_for(lambda: peers() == {"w-1"}, 30, what="w-0 to see w-1")
            (peer,) = client.list_peers(timeout=10).peers
            assert dict(peer.labels)["role"] == "decode"
    finally:
        for process in processes:
            process.terminate(30)


def test_an_injected_sidecar_follows_a_relay_verified_with_the_mounted_ca(
    control_plane: ControlPlane, cluster: Cluster, injecting: str, admin_api: KubeApi, tmp_path: pathlib.Path
) -> None:
    """The injection's upstream settings end to end: the relay's CA bundle in the namespace's ConfigMap
    discovery-sidecar-upstream-ca is mounted into the injected sidecar (the optional volume), whose
    DISCOVERY_UPSTREAM_CA names it; the sidecar verifies the relay with it, follows it, and lists a worker the
    relay sees as its peer. A worker injected without the annotations watches the API server as before."""
    tls = make_relay_tls(tmp_path / "relay-pki")
    admin_api.create(
        f"/api/v1/namespaces/{injecting}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "discovery-sidecar-upstream-ca"},
            "data": {"ca.crt": tls.ca.read_text()},
        },
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "workers", "labels": DYNAMO_LABEL},
        "spec": {"clusterIP": "None", "selector": {"app": "workers"}, "ports": [{"name": "http", "port": 8000}]},
    }
    admin_api.create(f"/api/v1/namespaces/{injecting}/services", service)
    relay = launch_relay(
        "relay-0",
        control_plane.kubeconfig,
        tls,
        tmp_path / "relay",
        {
            "DISCOVERY_NAMESPACES": injecting,
            "DISCOVERY_ENDPOINTSLICE_SELECTOR": "nvidia.com/dynamo-discovery-enabled=true",
        },
    )
    processes: list[SidecarProcess] = []
    try:
        relay.wait_ready(60)
        follow = {
            f"{TEMPLATE.annotation_prefix}upstream": relay.address,
            f"{TEMPLATE.annotation_prefix}upstream-ca": "/etc/discovery-sidecar/upstream-ca/ca.crt",
        }
        for name, annotations in (("w-0", {}), ("f-0", follow)):
            created = admin_api.create(
                PODS.collection(injecting),
                pod_body(
                    name,
                    {"app": "workers", LABEL: "true"},
                    annotations,
                    containers=[
                        {"name": "main", "image": "ex/w:1", "ports": [{"containerPort": 8000, "name": "http"}]}
                    ],
                ),
            )
            (sidecar,) = sidecars_in(created["spec"])
            env = {e["name"]: e.get("value") for e in sidecar["env"]}
            assert ("DISCOVERY_UPSTREAM" in env) == bool(annotations), env
            pod = cluster.set_pod_status(injecting, name, ready=True)
            processes.append(
                launch_from_pod(control_plane, cluster, pod, tmp_path, extra_env={"DISCOVERY_BACKOFF_MAX": "2s"})
            )
        for process in processes:
            process.wait_ready(60)
        follower = processes[1]
        assert follower.settings()["DISCOVERY_UPSTREAM_CA"].startswith(str(tmp_path)), "the mounted file, not a path"
        with DiscoveryClient(follower.target) as client:
            assert wait_for(
                lambda: {p.name for p in client.list_peers(timeout=10).peers} == {"w-0"},
                30,
                what="the follower to see w-0 through the relay",
            )
    finally:
        for process in processes:
            process.terminate(30)
        relay.terminate()


# -- a policy whose parameters' kind is unknown refuses only the pods that opted in ----------------------------------


@pytest.fixture(scope="module")
def plane_without_params_crd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of its own: the session's has the SidecarInjection CRD, which this case must lack."""
    plane = ControlPlane(bin_dir=ensure_built(), work_dir=tmp_path_factory.mktemp("no-params-crd"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def test_without_the_parameters_crd_only_pods_that_opted_in_are_refused(
    plane_without_params_crd: ControlPlane, tmp_path: pathlib.Path
) -> None:
    """The component's policies and bindings with no SidecarInjection CRD (deleted, not installed yet, or not
    yet known to admission): the policies' paramKind cannot be resolved, and with failurePolicy Fail each
    refuses what its matchConstraints match. Those match only pods that opted in, so every other pod of the
    cluster is admitted; an opted-in pod is refused, naming its policy and the missing kind. Once the CRD
    and the namespace's parameters are installed, the same pods get the sidecar (no restart)."""
    plane = plane_without_params_crd
    api = KubeApi.from_kubeconfig(str(plane.kubeconfig))
    cluster = Cluster(api)
    try:
        documents = [d for d in yaml.safe_load_all(COMPONENT.read_text()) if d and d["kind"] != policy.PARAMS_KIND]
        path = tmp_path / "cluster-scoped.yaml"
        path.write_text(yaml.safe_dump_all(documents))
        kubectl(plane, "apply", "-f", str(path))
        cluster.create_namespace("plain")
        cluster.create_namespace("opted", labels={LABEL: "true"})
        for name in ("plain", "opted"):
            cluster.wait_for_service_account(name, "default")

        def bare(name: str, labels: dict[str, str]) -> dict[str, Any]:  # no sidecar ServiceAccount here
            return pod_body(name, labels, serviceAccountName="default", automountServiceAccountToken=False)

        def refusal(namespace: str, labels: dict[str, str]) -> str:
            try:
                dry_run_create(api, namespace, bare("probe", labels))
            except ApiError as exc:
                assert exc.status == 403, exc
                return exc.message
            return ""

        # Refused once admission has loaded each policy (before that, nothing is matched at all).
        by_pod_label = wait_for(lambda: refusal("plain", {LABEL: "true"}), 60, what="the pods policy to refuse")
        by_namespace = wait_for(lambda: refusal("opted", {"app": "w"}), 60, what="the namespaces policy to refuse")
        kind = f"{policy.PARAMS_API_VERSION}, Kind={policy.PARAMS_KIND}"
        for message, opt_in in ((by_pod_label, "pods"), (by_namespace, "namespaces")):
            assert f'policy "{policy.policy_name(opt_in)}" denied request' in message, message
            assert f"failed to find resource referenced by paramKind: '{kind}'" in message, message
        assert refusal("opted", {LABEL: "true"}), "a labelled pod in a labelled namespace is refused too"

        # Everyone else is admitted, stored for real, and untouched.
        for namespace, labels in (("plain", {"app": "w"}), ("plain", {LABEL: "false"}), ("opted", {LABEL: "false"})):
            created = api.create(PODS.collection(namespace), bare(f"{namespace}-{labels.get(LABEL, 'none')}", labels))
            assert sidecars_in(created["spec"]) == [], (namespace, labels)

        # The CRD and the parameters arrive: admission resolves the kind (its discovery cache is refreshed
        # every 30 s) and the opted-in pods get the sidecar.
        kubectl(plane, "apply", "-f", str(PARAMS_CRD))
        kubectl(plane, "wait", "--for=condition=Established", f"crd/{policy.PARAMS_PLURAL}.{policy.PARAMS_GROUP}")
        (params,) = [d for d in yaml.safe_load_all(COMPONENT.read_text()) if d and d["kind"] == policy.PARAMS_KIND]
        for name in ("plain", "opted"):
            api.create(f"/apis/{policy.PARAMS_API_VERSION}/namespaces/{name}/{policy.PARAMS_PLURAL}", params)
        image = TEMPLATE.parameters["image"]
        assert wait_until_injecting(api, "plain")["image"] == image
        assert wait_until_injecting(api, "opted", body=bare("ns-probe", {"app": "w"}))["image"] == image
    finally:
        api.close()
