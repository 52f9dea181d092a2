"""The Helm chart (charts/discovery-sidecar) with the real helm (v4, built by devcluster) on the real API server.

A control plane of this module's own starts bare (the session's has the project's CRD installed already):
the chart is linted, rendered and dry-run applied server-side, installed, upgraded and uninstalled, once
where no one owns the DynamoWorkerMetadata CRD (the chart installs it and keeps it) and once beside
Dynamo's released CRDs (``tests/fixtures/dynamo``), which must stay byte-identical throughout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devcluster.build import ROOT, ensure_built
from devcluster.cluster import ControlPlane
from devcluster.crds import delete_crds
from devcluster.injection import wait_until_injecting
from devcluster.objects import PODS, Cluster
from devcluster.waiting import wait_for
from sidecar.app.injection.policy import opt_ins, policy_name
from sidecar.app.injection.template import load_template
from sidecar.kube.api import ApiError, KubeApi
from tests.conftest import Sidecars, kubectl

pytestmark = pytest.mark.integration

CHART = ROOT / "charts" / "discovery-sidecar"
FIXTURES = ROOT / "tests" / "fixtures"
DYNAMO_CRDS = sorted((FIXTURES / "dynamo").glob("*.yaml"))
MONITORING_CRDS = sorted((FIXTURES / "prometheus-operator").glob("*.yaml"))
EVERYTHING_ON = [
    "--set", "rbac.podDiscovery=true",
    "--set", "rbac.allNamespaces=endpointslices",
    "--set", "smgGateway.enabled=true",
    "--set", "monitoring.podMonitor.enabled=true",
    "--set", "monitoring.alerts.enabled=true",
    "--set", "monitoring.dashboard.enabled=true",
]  # fmt: skip
TEMPLATE = load_template()


@pytest.fixture(scope="module")
def bare_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(bin_dir=ensure_built(), work_dir=tmp_path_factory.mktemp("bare-controlplane"))
    plane.start()
    try:
        for crd in MONITORING_CRDS:
            kubectl(plane, "create", "-f", str(crd))
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def bare_api(bare_plane: ControlPlane) -> Iterator[KubeApi]:
    api = KubeApi.from_kubeconfig(str(bare_plane.kubeconfig))
    yield api
    api.close()


def helm(plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    homes = {f"HELM_{kind}_HOME": str(plane.work_dir / f"helm-{kind.lower()}") for kind in ("CACHE", "CONFIG", "DATA")}
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), **homes}
    result = subprocess.run([str(plane.bin_dir / "helm"), *args], capture_output=True, text=True, env=env, timeout=180)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def namespaces(api: KubeApi, *names: str) -> None:
    for name in names:
        try:
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        except ApiError as exc:
            if exc.status != 409:
                raise


def get(api: KubeApi, path: str) -> dict[str, Any] | None:
    try:
        return api.get(path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def crd_json(plane: ControlPlane, name: str) -> dict[str, Any] | None:
    """A CRD as the API server holds it, through kubectl (the sidecar's bounded JSON decoder, which guards it
    against hostile peers, takes seconds over Dynamo's 1.6 MB CRD)."""
    output = kubectl(plane, "get", f"crd/{name}", "-o", "json", "--ignore-not-found")
    return json.loads(output) if output.strip() else None


def crds(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    """The Dynamo fixtures' CRDs as the API server holds them (metadata and spec, every byte)."""
    found = {}
    for path in DYNAMO_CRDS:
        (document,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        name = document["metadata"]["name"]
        crd = crd_json(plane, name)
        assert crd is not None, name
        crd.pop("status", None)  # the API server's conditions, not the object anyone wrote
        found[name] = crd
    return found


def field_managers(plane: ControlPlane, name: str) -> set[str]:
    """Who manages a CRD's fields (its status, written by the API server, aside)."""
    entries = '{range .metadata.managedFields[*]}{.manager}/{.subresource}{"\\n"}{end}'
    output = kubectl(plane, "get", f"crd/{name}", "--show-managed-fields", "-o", f"jsonpath={entries}")
    return {line.split("/")[0] for line in output.splitlines() if line and not line.endswith("/status")}


def wait_established(plane: ControlPlane, name: str) -> None:
    def established() -> bool:
        crd = crd_json(plane, name) or {}
        conditions = (crd.get("status") or {}).get("conditions") or ()
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_for(established, 60, what=f"CRD {name} established")


OUR_CRD = "dynamoworkermetadatas.nvidia.com"
THEIR_CRDS = sorted(d["metadata"]["name"] for p in DYNAMO_CRDS for d in yaml.safe_load_all(p.read_text()) if d)
"""Dynamo's CRDs (the fixtures), ours among them: what the two install tests start without, or from."""


def releases(plane: ControlPlane) -> list[tuple[str, str]]:
    states = ("--deployed", "--failed", "--pending", "--uninstalling")  # every release that may hold objects
    listed = json.loads(helm(plane, "list", "--all-namespaces", *states, "-o", "json").stdout or "[]")
    return [(r["name"], r["namespace"]) for r in listed]


@pytest.fixture
def clean_slate(bare_plane: ControlPlane, bare_api: KubeApi) -> Iterator[None]:
    """No release and none of the DynamoWorkerMetadata or Dynamo CRDs, before the test (whatever an earlier
    one left, e.g. after failing half-way) and after it; checked, not assumed."""

    def clear() -> None:
        for name, namespace in releases(bare_plane):
            helm(bare_plane, "uninstall", name, "-n", namespace, "--wait")
        delete_crds(bare_plane, bare_api, THEIR_CRDS)
        assert releases(bare_plane) == []
        assert all(crd_json(bare_plane, name) is None for name in THEIR_CRDS), "CRDs left"

    clear()
    yield
    clear()


def test_lint(bare_plane: ControlPlane) -> None:
    result = helm(bare_plane, "lint", "--strict", str(CHART), *EVERYTHING_ON)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    result = helm(bare_plane, "lint", "--strict", str(CHART), "--set", "admissionPolicy.containerMode=true")
    assert "0 chart(s) failed" in result.stdout


def test_bad_values_are_refused_with_their_name(bare_plane: ControlPlane) -> None:
    for values, message in (
        (["--set", "crd.install=always"], "crd.install must be auto or never"),
        (["--set", "rbac.allNamespaces=secrets"], "rbac.allNamespaces must be endpointslices, pods or empty"),
        (["--set", "smgGateway.enabled=true"], "smgGateway.enabled needs rbac.podDiscovery=true"),
        (["--set", "relay.enabled=true", "--set", "relay.replicas=1"], "relay.replicas must be at least 2"),
        (["--set", "relay.enabled=true", "--set", "relay.namespaces={*,a}"], 'relay.namespaces: "*"'),
    ):
        result = helm(bare_plane, "template", "t", str(CHART), *values, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr


def test_template_is_accepted_by_a_server_side_dry_run(bare_plane: ControlPlane, bare_api: KubeApi) -> None:
    """Everything on, in two namespaces: the API server validates every object against its schema (the
    Prometheus Operator's real CRDs included) and warns about nothing."""
    namespaces(bare_api, "chart-sys", "team-a", "team-b")
    # helm template leaves out crds/ (helm install applies them first): the parameter objects' CRD.
    kubectl(bare_plane, "apply", "-f", str(CHART / "crds"))
    wait_established(bare_plane, "sidecarinjections.discovery-sidecar.io")
    relay = ["--set", "relay.enabled=true", "--set", "relay.tls.caBundle=-----BEGIN CERTIFICATE-----"]
    for extra in (
        [],
        ["--set", "admissionPolicy.containerMode=true", "--set", "rbac.allNamespaces=pods"],
        [*relay, "--set", "relay.namespaces={*}"],
    ):
        rendered = helm(
            bare_plane, "template", "ds", str(CHART), "-n", "chart-sys",
            "--set", "namespaces={team-a,team-b,chart-sys}", *EVERYTHING_ON, *extra,
        ).stdout  # fmt: skip
        kinds = {d["kind"] for d in yaml.safe_load_all(rendered) if d}
        assert {"MutatingAdmissionPolicy", "ValidatingAdmissionPolicy", "PodMonitor", "PrometheusRule"} <= kinds
        if relay[1] in extra:
            assert {"Deployment", "Service", "PodDisruptionBudget", "ClusterRoleBinding", "ConfigMap"} <= kinds
        path = bare_plane.work_dir / "rendered.yaml"
        path.write_text(rendered)
        output = kubectl(bare_plane, "apply", "--dry-run=server", "--validate=strict", "-f", str(path))
        assert "Warning" not in output, output


def test_the_injection_parameters_are_the_templates(bare_plane: ControlPlane) -> None:
    """The chart's defaults render the parameter object the template ships (image, resources, settings)."""
    rendered = helm(bare_plane, "template", "ds", str(CHART), "--show-only", "templates/injection.yaml").stdout
    (params,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "SidecarInjection"]
    assert params["data"] == TEMPLATE.default_params()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(values["injection"]["defaults"]) == [s.key for s in TEMPLATE.settings]


@pytest.mark.usefixtures("clean_slate")
def test_the_relay_installs_and_injected_sidecars_follow_it(
    bare_plane: ControlPlane, bare_api: KubeApi, clean_slate: None
) -> None:
    """relay.enabled: the relay's objects are installed in the release's namespace, its peer-reading ClusterRole
    bound in each namespace it serves, the CA bundle in each sidecar namespace, and the injection's parameters
    point injected sidecars at the relay's Service with that CA."""
    namespaces(bare_api, "relay-sys", "relay-a", "relay-b")
    # No --wait: the relay's Deployment never becomes available without a kubelet.
    helm(bare_plane, "install", "ds", str(CHART), "-n", "relay-sys", "--set", "namespaces={relay-a,relay-b}",
         "--set", "relay.enabled=true", "--set", "relay.tls.caBundle=-----BEGIN CERTIFICATE-----")  # fmt: skip
    deployment = bare_api.get("/apis/apps/v1/namespaces/relay-sys/deployments/discovery-sidecar-relay")
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISCOVERY_NAMESPACES"] == "relay-a,relay-b"
    assert container["args"] == ["relay"]
    assert get(bare_api, "/apis/policy/v1/namespaces/relay-sys/poddisruptionbudgets/discovery-sidecar-relay")
    for namespace in ("relay-a", "relay-b"):
        binding = bare_api.get(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/discovery-sidecar-relay"
        )
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "discovery-sidecar-relay", "namespace": "relay-sys"}
        ]
        ca = bare_api.get(f"/api/v1/namespaces/{namespace}/configmaps/discovery-sidecar-upstream-ca")
        assert ca["data"] == {"ca.crt": "-----BEGIN CERTIFICATE-----"}
        params = bare_api.get(
            f"/apis/discovery-sidecar.io/v1alpha1/namespaces/{namespace}/sidecarinjections/discovery-sidecar-injection"
        )
        assert params["data"]["upstream"] == "discovery-sidecar-relay.relay-sys.svc:50052"
        assert params["data"]["upstream-ca"] == "/etc/discovery-sidecar/upstream-ca/ca.crt"
    assert not get(bare_api, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/discovery-sidecar-relay")
    assert get(bare_api, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/discovery-sidecar-relay-auth")
    helm(bare_plane, "uninstall", "ds", "-n", "relay-sys", "--wait")


def test_install_upgrade_uninstall_where_no_one_owns_the_crd(bare_plane: ControlPlane, bare_api: KubeApi) -> None:
    """The chart installs the CRD, keeps owning it through an upgrade, and leaves it (keep) when uninstalled;
    a pod labelled for injection gets the chart's image, and the upgrade's image after it."""
    namespaces(bare_api, "own-sys", "own-a")
    helm(bare_plane, "install", "ds", str(CHART), "-n", "own-sys", "--set", "namespaces={own-a}", "--wait")
    crd = crd_json(bare_plane, "dynamoworkermetadatas.nvidia.com")
    assert crd is not None
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "ds"
    wait_established(bare_plane, "dynamoworkermetadatas.nvidia.com")
    assert injected_image(bare_api, "own-a") == TEMPLATE.parameters["image"]

    helm(bare_plane, "upgrade", "ds", str(CHART), "-n", "own-sys", "--set", "namespaces={own-a}",
         "--set", "image.tag=9.9.9", "--set", "admissionPolicy.containerMode=true", "--wait")  # fmt: skip
    assert "ds" in helm(bare_plane, "get", "manifest", "ds", "-n", "own-sys").stdout
    assert "CustomResourceDefinition" in helm(bare_plane, "get", "manifest", "ds", "-n", "own-sys").stdout
    policy = bare_api.get(
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/dynamoworkermetadata-own-pod-only"
    )
    assert "startsWith(variables.podName + '-')" in json.dumps(policy["spec"]), "the container-mode variant"
    wait_for(lambda: injected_image(bare_api, "own-a") == "ghcr.io/example/discovery-sidecar:9.9.9", 30,
             what="the upgraded parameters")  # fmt: skip

    helm(bare_plane, "uninstall", "ds", "-n", "own-sys", "--wait")
    assert crd_json(bare_plane, "dynamoworkermetadatas.nvidia.com") is not None, "kept on uninstall"
    for name in map(policy_name, opt_ins(TEMPLATE)):
        assert get(bare_api, f"/apis/admissionregistration.k8s.io/v1/mutatingadmissionpolicies/{name}") is None
    assert get(bare_api, "/api/v1/namespaces/own-a/serviceaccounts/discovery-sidecar") is None

    # Installed again, the release takes its kept CRD back (it carries this release's name).
    helm(bare_plane, "install", "ds", str(CHART), "-n", "own-sys", "--set", "namespaces={own-a}", "--wait")
    assert "CustomResourceDefinition" in helm(bare_plane, "get", "manifest", "ds", "-n", "own-sys").stdout
    helm(bare_plane, "uninstall", "ds", "-n", "own-sys", "--wait")


DGD_EXAMPLE = ROOT / "manifests" / "examples" / "dynamo-graph-deployment.yaml"


@pytest.mark.usefixtures("clean_slate")
def test_beside_dynamos_crds_which_stay_byte_identical(bare_plane: ControlPlane, bare_api: KubeApi) -> None:
    """Dynamo's platform installed its CRDs first (server-side apply, as its operator's crd-apply does): the
    chart leaves them exactly as they are through install, upgrade and uninstall, and everything else works,
    the DynamoGraphDeployment recipe included (docs/dynamo.md)."""
    namespaces(bare_api, "dyn-sys", "inference")
    for path in DYNAMO_CRDS:
        kubectl(bare_plane, "apply", "--server-side", "--field-manager=dynamo-operator", "-f", str(path))
    wait_established(bare_plane, "dynamographdeployments.nvidia.com")
    recipe = [
        "--set", "namespaces={inference}",
        "--set", "rbac.extraSubjects[0].kind=ServiceAccount",
        "--set", "rbac.extraSubjects[0].name=llm-k8s-service-discovery",
    ]  # fmt: skip
    before = crds(bare_plane)
    for name in before:  # the precondition: Dynamo's operator alone manages them
        assert field_managers(bare_plane, name) == {"dynamo-operator"}, name
    # No --wait: the SMG gateway's Deployment never becomes available without a kubelet.
    helm(bare_plane, "install", "ds", str(CHART), "-n", "dyn-sys", *recipe, *EVERYTHING_ON)
    assert crds(bare_plane) == before
    assert "CustomResourceDefinition" not in helm(bare_plane, "get", "manifest", "ds", "-n", "dyn-sys").stdout
    assert injected_image(bare_api, "inference") == TEMPLATE.parameters["image"]
    check_dynamo_recipe(bare_plane, bare_api)
    helm(bare_plane, "upgrade", "ds", str(CHART), "-n", "dyn-sys", *recipe, *EVERYTHING_ON,
         "--set", "injection.defaults.watch=always")  # fmt: skip
    assert crds(bare_plane) == before
    helm(bare_plane, "uninstall", "ds", "-n", "dyn-sys", "--wait")
    assert crds(bare_plane) == before


def check_dynamo_recipe(plane: ControlPlane, api: KubeApi) -> None:
    """The example DynamoGraphDeployment passes Dynamo's real CRD schema (server-side dry run); a pod of each
    component, as the operator makes it (the podTemplate's metadata and containers, under the operator's
    ServiceAccount NAME-k8s-service-discovery), gets the sidecar with the component's settings; and that
    ServiceAccount may do what the sidecar does, through the chart's extra subject."""
    output = kubectl(plane, "create", "--dry-run=server", "--validate=strict", "-f", str(DGD_EXAMPLE))
    assert "created (server dry run)" in output and "Warning" not in output, output
    (graph,) = [d for d in yaml.safe_load_all(DGD_EXAMPLE.read_text()) if d]
    account = f"{graph['metadata']['name']}-k8s-service-discovery"
    namespace = graph["metadata"]["namespace"]
    api.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": account}})  # fmt: skip
    for component in graph["spec"]["components"]:
        template = component["podTemplate"]
        assert template["metadata"]["labels"][TEMPLATE.label] == "true", component["name"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": f"llm-{component['name']}-", **template["metadata"]},
            "spec": {**template["spec"], "serviceAccountName": account},
        }
        admitted = api.request("POST", PODS.collection(namespace), [("dryRun", "All")], body=pod)["spec"]
        (sidecar,) = [c for c in admitted["initContainers"] if c["name"] == TEMPLATE.container_name]
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert env["DISCOVERY_REGISTER"] == "never", component["name"]
        assert env["DISCOVERY_ENDPOINTSLICE_SELECTOR"] == "nvidia.com/dynamo-discovery-enabled=true"
    subject = f"--as=system:serviceaccount:{namespace}:{account}"
    for verb in ("create", "patch", "watch"):
        answer = kubectl(plane, "auth", "can-i", verb, "dynamoworkermetadatas.nvidia.com", subject, namespace=namespace)
        assert answer.strip() == "yes", (verb, answer)


def injected_image(api: KubeApi, namespace: str) -> str:
    """The sidecar image a labelled pod in ``namespace`` gets (server-side dry run), once injection is in effect
    there (right after an install, admission may not know the parameters' kind or object yet)."""
    return str(wait_until_injecting(api, namespace)["image"])


# -- observability: the dashboard and the alerts ask only for metrics the sidecar serves --------------------------

METRIC = re.compile(r"\bdiscovery_[a-z_]+\b")


def queried_metrics() -> dict[str, set[str]]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    used: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.setdefault(f"dashboard panel {panel['title']!r}", set()).update(METRIC.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        used.setdefault(f"dashboard variable {variable['name']}", set()).update(
            METRIC.findall(str(variable.get("query")))
        )
    for group in alerts["groups"]:
        for rule in group["rules"]:
            used[f"alert {rule['alert']}"] = set(METRIC.findall(rule["expr"]))
    return used


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in ("timeseries", "stat") and panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "namespace"}


def test_every_metric_queried_exists_in_the_sidecars_metrics(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars
) -> None:
    """A running sidecar's /metrics names every metric the dashboard and the alerts use (histograms by their
    _bucket/_sum/_count series), so no panel stays empty and no alert can never fire for want of a series."""
    cluster.create_service(namespace, "workers", {"app": "w"})
    pod = cluster.start_pod(namespace, "w-0", {"app": "w"})
    process = sidecars.start(pod, "workers").wait_ready(30)
    status, text = process.http_get("/metrics")
    assert status == 200
    served = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            served.add(name)
            if kind == "histogram":
                served |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                served.add(f"{name}_total")
    used = queried_metrics()
    assert {"discovery_api_connected", "discovery_ready", "discovery_registered",
            "discovery_stream_slow_client_resets_total"} <= set().union(*used.values())  # fmt: skip
    missing = {where: sorted(names - served) for where, names in used.items() if names - served}
    assert not missing, f"not in the sidecar's /metrics: {missing}"
    assert re.search(r"^discovery_ready 1\.0$", text, re.M), "a ready sidecar says so in discovery_ready"


def test_chart_files_are_the_manifests() -> None:
    """The chart's files/ are copies of manifests/ (one content, two ways to install it)."""
    copies = {
        "crd.yaml": "components/crd/crd.yaml",
        "admission-policy.yaml": "admission-policy.yaml",
        "admission-policy-container-mode.yaml": "components/container-mode/admission-policy-container-mode.yaml",
        "rbac.yaml": "rbac.yaml",
        "rbac-pod-discovery.yaml": "components/pod-discovery/rbac-pod-discovery.yaml",
        "rbac-all-namespaces.yaml": "optional/rbac-all-namespaces.yaml",
        "rbac-pod-discovery-all-namespaces.yaml": "optional/rbac-pod-discovery-all-namespaces.yaml",
        "smg-gateway.yaml": "components/smg/smg-gateway.yaml",
        "relay.yaml": "components/relay/relay.yaml",
        "relay-rbac.yaml": "components/relay/relay-rbac.yaml",
    }
    for chart_file, manifest in copies.items():
        chart_text = (CHART / "files" / chart_file).read_text()
        assert chart_text == (ROOT / "manifests" / manifest).read_text(), f"files/{chart_file} != manifests/{manifest}"
