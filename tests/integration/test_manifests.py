"""The manifests are accepted by a real API server, and the example workload is wired up consistently.

The kustomize base (``manifests/``) holds only what every namespace needs (RBAC and the admission policy);
the CRD, injection, pod discovery, container mode and the SMG gateway are components a user includes.

Every manifest is applied with a server-side dry run (schema, strict field validation, admission) and
then for real into a fresh namespace; applying again changes nothing, including the cluster-scoped CRD
and admission policy that the session already installed. There is no kubelet or scheduler, so the
Deployment's pods never run: instead a pod made from its template goes through the API server's
admission (server-side dry run: pod validation, the ServiceAccount must exist), the ServiceAccount's
permissions are asked of the authorizer, and the sidecar's own configuration loader reads the
container's environment and downward-API files as the pod would present them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from typing import Any

import pytest
import yaml

from devcluster.cluster import ControlPlane
from devcluster.waiting import wait_for
from sidecar.app.config import OPTIONS, OPTIONS_BY_ENV, load_settings
from tests.conftest import MANIFESTS, kubectl

pytestmark = pytest.mark.integration

MANIFEST_FILES = (
    "components/crd/crd.yaml",
    "rbac.yaml",
    "admission-policy.yaml",
    "examples/example-workload.yaml",
)
BASE_FILES = ("rbac.yaml", "admission-policy.yaml")
BASE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
COMPONENTS = ("crd", "injection", "pod-discovery", "container-mode", "smg", "relay")
CLUSTER_SCOPED = (
    "customresourcedefinition/dynamoworkermetadatas.nvidia.com",
    "validatingadmissionpolicy/dynamoworkermetadata-own-pod-only",
    "validatingadmissionpolicybinding/dynamoworkermetadata-own-pod-only",
)
ALL_KINDS = {
    "CustomResourceDefinition",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
}
DEPLOYMENT = "dynamo-worker-prefill"
SIDECAR = "discovery-sidecar"
SERVICE_ACCOUNT = "discovery-sidecar"
RELAY = "discovery-sidecar-relay"


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _workload() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = {d["kind"]: d for d in _documents((MANIFESTS / "examples" / "example-workload.yaml").read_text())}
    assert set(docs) == {"Service", "Deployment"}, sorted(docs)
    return docs["Service"], docs["Deployment"]


def _kubectl_json(plane: ControlPlane, *args: str, namespace: str | None = None) -> dict[str, Any]:
    """Like ``kubectl()``, but only stdout, parsed (warnings on stderr would spoil the JSON)."""
    argv = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}"]
    if namespace:
        argv.append(f"--namespace={namespace}")
    result = subprocess.run([*argv, *args, "-o", "json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


def _generations(plane: ControlPlane) -> dict[str, int]:
    return {name: _kubectl_json(plane, "get", name)["metadata"]["generation"] for name in CLUSTER_SCOPED}


def _container(spec: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    found = [c for c in spec.get(section, []) if c["name"] == name]
    assert len(found) == 1, (
        f"expected one {section} entry named {name}, found {[c['name'] for c in spec.get(section, [])]}"
    )
    return found[0]


def test_the_base_lists_what_every_namespace_needs_and_nothing_else() -> None:
    """No CRD (Dynamo's platform may own it) and no example workload in what `kubectl apply -k manifests/` does."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert list(kustomization["resources"]) == list(BASE_FILES)
    on_disk = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert on_disk == sorted(BASE_FILES), "a manifest at the top level is missing from the base"


def test_every_component_lists_its_files() -> None:
    for name in COMPONENTS:
        directory = MANIFESTS / "components" / name
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component", name
        listed = [*kustomization.get("resources", ()), *(p["path"] for p in kustomization.get("patches", ()))]
        on_disk = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(listed) == on_disk, name
    assert sorted(p.name for p in (MANIFESTS / "components").iterdir()) == sorted(COMPONENTS)


def _kustomize(plane: ControlPlane, directory: pathlib.Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(plane.kubectl), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return _documents(result.stdout)


def _overlay(tmp_path: pathlib.Path, components: tuple[str, ...]) -> pathlib.Path:
    """A user's kustomization: the base and the components they chose (paths relative, as kustomize wants)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    relative = pathlib.Path(os.path.relpath(MANIFESTS, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(relative)],
                "components": [str(relative / "components" / c) for c in components],
            }
        )
    )
    return overlay


def test_kustomize_renders_the_base_and_every_component(
    control_plane: ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> None:
    base = _kustomize(control_plane, MANIFESTS)
    assert {d["kind"] for d in base} == BASE_KINDS
    names = {(d["kind"], d["metadata"]["name"]) for d in base}
    assert ("ServiceAccount", SERVICE_ACCOUNT) in names

    overlay = _overlay(tmp_path, COMPONENTS)
    rendered = _kustomize(control_plane, overlay)
    kinds = {d["kind"] for d in rendered}
    assert (
        BASE_KINDS | {"CustomResourceDefinition", "MutatingAdmissionPolicy", "SidecarInjection", "Deployment"} <= kinds
    )
    (policy,) = [d for d in rendered if d["kind"] == "ValidatingAdmissionPolicy"]
    variant = _documents(
        (MANIFESTS / "components" / "container-mode" / "admission-policy-container-mode.yaml").read_text()
    )

    # (kustomize re-folds the CEL's folded scalars: whitespace differs, which CEL ignores)
    def flat(spec: dict[str, Any]) -> str:
        return re.sub(r"\s+", " ", json.dumps(spec, sort_keys=True).replace("\\n", " "))

    assert flat(policy["spec"]) == flat(variant[0]["spec"]), "the container-mode component replaces the strict policy"
    named = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("Role", "discovery-sidecar-pod-discovery") in named
    relay = {("Deployment", RELAY), ("Service", RELAY), ("PodDisruptionBudget", RELAY), ("ServiceAccount", RELAY)}
    assert relay | {("ClusterRoleBinding", RELAY), ("ClusterRoleBinding", f"{RELAY}-auth")} <= named
    # What kustomize renders is accepted as a whole, once the parameter objects' CRD is established (as the
    # component's README says: it is applied first).
    kubectl(control_plane, "apply", "-f", str(MANIFESTS / "components" / "injection" / "sidecarinjections.yaml"))
    wait_for(
        lambda: "SidecarInjection" in kubectl(control_plane, "api-resources", "--api-group=discovery-sidecar.io"),
        60,
        what="the SidecarInjection kind to be served",
    )
    output = kubectl(
        control_plane, "apply", "--dry-run=server", "--validate=strict", "-k", str(overlay), namespace=namespace
    )
    assert "Warning" not in output, output
    output = kubectl(
        control_plane, "apply", "--dry-run=server", "--validate=strict", "-k", str(MANIFESTS), namespace=namespace
    )
    assert "Warning" not in output, output


def _wait_for_deployment_status(plane: ControlPlane, namespace: str) -> None:
    def observed() -> bool:
        deployment = _kubectl_json(plane, "get", "deployment", DEPLOYMENT, namespace=namespace)
        meta, status = deployment["metadata"], deployment.get("status") or {}
        return (
            "deployment.kubernetes.io/revision" in (meta.get("annotations") or {})
            and status.get("observedGeneration") == meta["generation"]
            and status.get("replicas") == status.get("updatedReplicas") == deployment["spec"]["replicas"]
        )

    wait_for(observed, 60, interval=0.2, what=f"the Deployment controller's status of {DEPLOYMENT}")


def test_manifests_apply_dry_run_then_for_real_and_again(control_plane: ControlPlane, namespace: str) -> None:
    before = _generations(control_plane)
    for name in MANIFEST_FILES:
        output = kubectl(
            control_plane,
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            str(MANIFESTS / name),
            namespace=namespace,
        )
        assert "Warning" not in output, f"{name}: the API server warns:\n{output}"
    for name in MANIFEST_FILES:
        kubectl(control_plane, "apply", "--validate=strict", "-f", str(MANIFESTS / name), namespace=namespace)
    # The Deployment controller writes the Deployment too (its revision annotation, then its status as its
    # ReplicaSet's pods are created, Pending for ever with no scheduler): compare only once it has.
    _wait_for_deployment_status(control_plane, namespace)

    # Idempotent: applying again writes nothing (every object keeps its resourceVersion), and the
    # cluster-scoped objects the session had installed kept their spec (generation) through it all.
    # (kubectl may still print "configured" where a list is atomic and the server defaults a field in
    # it, as with the policy's resourceRules[].scope: its patch is then a no-op, which is what counts.)
    def versions() -> dict[str, str]:
        found = {}
        for name in MANIFEST_FILES:
            listed = _kubectl_json(control_plane, "get", "-f", str(MANIFESTS / name), namespace=namespace)
            for obj in listed["items"] if listed["kind"] == "List" else [listed]:  # one object comes bare
                found[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
        return found

    applied = versions()
    assert {key.split("/")[0] for key in applied} == ALL_KINDS
    for name in MANIFEST_FILES:
        kubectl(control_plane, "apply", "-f", str(MANIFESTS / name), namespace=namespace)
    assert versions() == applied, "applying the manifests a second time changed objects"
    assert _generations(control_plane) == before

    deployment = _kubectl_json(control_plane, "get", "deployment", DEPLOYMENT, namespace=namespace)
    spec = deployment["spec"]["template"]["spec"]
    sidecar = _container(spec, "initContainers", SIDECAR)
    assert sidecar["restartPolicy"] == "Always", "the sidecar must be a native sidecar"
    assert SIDECAR not in [c["name"] for c in spec["containers"]]
    assert sidecar["image"] == "ghcr.io/example/discovery-sidecar:0.1.0"
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    assert spec["terminationGracePeriodSeconds"] == 30
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["metadata"]["labels"]["role"] == "prefill"

    service = _kubectl_json(control_plane, "get", "service", "dynamo-worker", namespace=namespace)
    assert service["spec"]["clusterIP"] == "None"
    assert _kubectl_json(control_plane, "get", "serviceaccount", SERVICE_ACCOUNT, namespace=namespace)


def test_a_pod_from_the_template_is_admitted(
    control_plane: ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> None:
    """Pod validation and admission (the ServiceAccount must exist) as the ReplicaSet's pods would meet them."""
    _, deployment = _workload()
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{DEPLOYMENT}-admission-check", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(pod))
    admitted = _kubectl_json(
        control_plane, "create", "--dry-run=server", "--validate=strict", "-f", str(path), namespace=namespace
    )
    spec = admitted["spec"]
    assert spec["serviceAccountName"] == SERVICE_ACCOUNT
    # The ServiceAccount admission plugin found the account and mounted its token into every container.
    token_volumes = [v["name"] for v in spec["volumes"] if v["name"].startswith("kube-api-access-")]
    assert len(token_volumes) == 1, spec["volumes"]
    sidecar = _container(spec, "initContainers", SIDECAR)
    assert token_volumes[0] in [m["name"] for m in sidecar["volumeMounts"]]


def test_the_service_account_may_do_what_the_sidecar_needs_and_no_more(
    control_plane: ControlPlane, namespace: str
) -> None:
    kubectl(control_plane, "apply", "-f", str(MANIFESTS / "examples" / "example-workload.yaml"), namespace=namespace)
    _, deployment = _workload()
    account = f"system:serviceaccount:{namespace}:{deployment['spec']['template']['spec']['serviceAccountName']}"

    def can(verb: str, resource: str, *extra: str) -> bool:
        output = kubectl(
            control_plane, "auth", "can-i", verb, resource, *extra, f"--as={account}", namespace=namespace, check=False
        )
        answer = output.strip().splitlines()[0] if output.strip() else ""
        assert answer in ("yes", "no"), output
        return answer == "yes"

    for verb in ("get", "list", "watch", "create", "patch", "delete"):
        assert can(verb, "dynamoworkermetadatas.nvidia.com"), f"the sidecar cannot {verb} its CRs"
    for verb in ("list", "watch"):
        assert can(verb, "endpointslices.discovery.k8s.io"), f"the sidecar cannot {verb} EndpointSlices"
    for verb, resource in (
        ("update", "dynamoworkermetadatas.nvidia.com"),
        ("deletecollection", "dynamoworkermetadatas.nvidia.com"),
        ("create", "endpointslices.discovery.k8s.io"),
        ("list", "pods"),
        ("get", "secrets"),
    ):
        assert not can(verb, resource), f"the sidecar may {verb} {resource}"
    assert not can("list", "dynamoworkermetadatas.nvidia.com", "--all-namespaces"), "a Role, not a ClusterRole"


def test_the_relay_may_read_peers_and_review_tokens_and_no_more(control_plane: ControlPlane, namespace: str) -> None:
    """The relay component's RBAC as the authorizer answers it: what ``discovery-sidecar relay`` does (list/watch
    peers everywhere, TokenReview, SubjectAccessReview) and nothing else. (bench.rollout's relay arm runs real relays
    with exactly these rights.)"""
    rbac = MANIFESTS / "components" / "relay" / "relay-rbac.yaml"
    kubectl(control_plane, "apply", "-f", str(rbac), namespace=namespace)
    account = f"system:serviceaccount:discovery-sidecar:{RELAY}"  # the subject its cluster bindings name
    try:

        def can(verb: str, resource: str, *extra: str) -> bool:
            output = kubectl(control_plane, "auth", "can-i", verb, resource, *extra, f"--as={account}", check=False)
            answer = output.strip().splitlines()[0] if output.strip() else ""
            assert answer in ("yes", "no"), output
            return answer == "yes"

        for verb in ("list", "watch"):
            for resource in ("dynamoworkermetadatas.nvidia.com", "endpointslices.discovery.k8s.io"):
                assert can(verb, resource, "--all-namespaces"), f"the relay cannot {verb} {resource}"
        assert can("create", "tokenreviews.authentication.k8s.io")
        assert can("create", "subjectaccessreviews.authorization.k8s.io")
        for verb, resource in (
            ("create", "dynamoworkermetadatas.nvidia.com"),
            ("patch", "dynamoworkermetadatas.nvidia.com"),
            ("delete", "dynamoworkermetadatas.nvidia.com"),
            ("get", "dynamoworkermetadatas.nvidia.com"),
            ("list", "pods"),
            ("get", "secrets"),
            ("create", "serviceaccounts/token"),
        ):
            assert not can(verb, resource, "--all-namespaces"), f"the relay may {verb} {resource}"
    finally:
        kubectl(control_plane, "delete", "-f", str(rbac), "--ignore-not-found", namespace=namespace)


def test_the_workload_is_wired_consistently(tmp_path: pathlib.Path) -> None:
    service, deployment = _workload()
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    spec = template["spec"]
    sidecar = _container(spec, "initContainers", SIDECAR)
    worker = _container(spec, "containers", "worker")

    # The Service selects these pods and is the one the sidecar watches.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"app": "dynamo-worker"}
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in worker["ports"]
    assert "readinessProbe" in worker

    # Every variable the sidecar gets is one it knows (a typo would be silently ignored otherwise).
    env = {e["name"]: e for e in sidecar["env"]}
    unknown = set(env) - set(OPTIONS_BY_ENV)
    assert not unknown, f"the sidecar does not read {sorted(unknown)}; it reads {[o.env for o in OPTIONS]}"
    for name, path in (
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
    ):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == path
    assert env["DISCOVERY_SERVICE_NAME"]["value"] == service["metadata"]["name"]

    # The downward-API volume has the files the sidecar reads, mounted where it looks for them.
    volumes = {v["name"]: v for v in spec["volumes"]}
    podinfo = volumes["podinfo"]["downwardAPI"]["items"]
    files = {item["path"]: item["fieldRef"]["fieldPath"] for item in podinfo}
    assert files == {
        "pod_name": "metadata.name",
        "pod_uid": "metadata.uid",
        "pod_namespace": "metadata.namespace",
        "labels": "metadata.labels",
    }
    assert set(files) == {o.podinfo_file for o in OPTIONS if o.podinfo_file}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounts[OPTIONS_BY_ENV["DISCOVERY_PODINFO_DIR"].default] == "podinfo"

    # The socket directory is one emptyDir shared by both containers.
    assert "emptyDir" in volumes[mounts["/run/discovery"]]
    assert {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}["/run/discovery"] == mounts["/run/discovery"]

    # The sidecar's configuration loader accepts the pod's settings, as the pod would present them.
    podinfo_dir = tmp_path / "podinfo"
    podinfo_dir.mkdir()
    identity = {
        "metadata.name": "dynamo-worker-prefill-abc12-xyz34",
        "metadata.namespace": "inference",
        "metadata.uid": "3f1c4a52-0d6b-4c1e-9f39-2b7a4f0e8d11",
    }
    for file, field in files.items():
        text = "\n".join(f'{k}="{v}"' for k, v in labels.items()) if field == "metadata.labels" else identity[field]
        (podinfo_dir / file).write_text(text)
    environ = {name: e.get("value") or identity[e["valueFrom"]["fieldRef"]["fieldPath"]] for name, e in env.items()}
    environ["DISCOVERY_PODINFO_DIR"] = str(podinfo_dir)
    settings = load_settings(environ=environ)
    assert settings.identity.name == identity["metadata.name"]
    assert settings.identity.uid == identity["metadata.uid"]
    assert dict(settings.pod_labels) == labels
    assert settings.grpc_listen.unix_path == "/run/discovery/discovery.sock"
    assert settings.http_listen is not None and settings.http_listen.port == 8090
    assert settings.shutdown_timeout < spec["terminationGracePeriodSeconds"]

    # Probes: /readyz gates start-up and readiness, /healthz liveness, all on the HTTP port.
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": settings.http_listen.port}, probe
    assert settings.http_listen.port in [p["containerPort"] for p in sidecar["ports"]]

    # Hardening and resources on both containers.
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in (sidecar, worker):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert spec["terminationGracePeriodSeconds"] == 30
