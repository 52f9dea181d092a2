"""The injection template and its Python application (``discovery-sidecar inject``).

What the admission policy does with the same template on a real API server, and that the two agree,
is in ``tests/integration/test_injection.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import pathlib
from typing import Any

import pytest
import yaml

from sidecar.app.cli import build_parser
from sidecar.app.config import OPTIONS_BY_ENV, load_settings
from sidecar.app.injection import manifests, policy
from sidecar.app.injection.pod import ParameterError, inject_pod, setting_values
from sidecar.app.injection.template import load_template

TEMPLATE = load_template()
PARAMS = TEMPLATE.default_params()
PREFIX = TEMPLATE.annotation_prefix
TOKEN = TEMPLATE.service_account_token_path


def pod_spec(**extra: Any) -> dict[str, Any]:
    return {"containers": [{"name": "main", "image": "ex/worker:1"}], **extra}


def injected(annotations: dict[str, str] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    result = inject_pod({"annotations": annotations or {}}, spec or pod_spec(), PARAMS, TEMPLATE)
    assert result is not None
    return result


def sidecar_env(spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in spec["initContainers"][0]["env"]}


class TestTemplate:
    def test_every_setting_is_a_sidecar_variable(self) -> None:
        """A typo in the template would inject a variable the sidecar ignores."""
        for setting in TEMPLATE.settings:
            assert setting.env in OPTIONS_BY_ENV, setting
        for entry in [*TEMPLATE.sidecar["env"], *TEMPLATE.app_container_env]:
            assert entry["name"] in OPTIONS_BY_ENV, entry

    def test_the_sidecar_is_a_native_sidecar_named_as_the_template_says(self) -> None:
        assert TEMPLATE.sidecar["name"] == TEMPLATE.container_name == "discovery-sidecar"
        assert TEMPLATE.sidecar["restartPolicy"] == "Always"

    def test_default_params_hold_every_parameter_and_setting(self) -> None:
        assert set(PARAMS) == set(TEMPLATE.parameters) | {s.key for s in TEMPLATE.settings}


class TestInjectPod:
    def test_adds_the_sidecar_first_the_volumes_and_the_app_containers_address(self) -> None:
        """The sidecar goes before the pod's own init containers (it serves them too)."""
        spec = injected(spec=pod_spec(initContainers=[{"name": "setup", "image": "ex/setup:1"}]))
        assert [c["name"] for c in spec["initContainers"]] == ["discovery-sidecar", "setup"]
        assert [v["name"] for v in spec["volumes"]] == ["discovery-podinfo", "discovery-tmp", "discovery-upstream-ca"]
        assert spec["containers"][0]["env"] == [{"name": "DISCOVERY_GRPC_LISTEN", "value": "127.0.0.1:50051"}]
        assert spec["initContainers"][0]["image"] == PARAMS["image"]

    def test_the_injected_environment_is_one_the_sidecar_accepts(self, tmp_path: Any) -> None:
        """Resolved as a kubelet would (field refs), the sidecar's loader takes it without a problem."""
        env = {}
        for entry in injected()["initContainers"][0]["env"]:
            if "valueFrom" in entry:
                env[entry["name"]] = {"metadata.name": "w-0", "metadata.namespace": "ns", "metadata.uid": "u-1"}[
                    entry["valueFrom"]["fieldRef"]["fieldPath"]
                ]
            else:
                env[entry["name"]] = entry["value"]
        settings = load_settings(environ={**env, "DISCOVERY_PODINFO_DIR": str(tmp_path)})
        assert settings.identity.name == "w-0" and settings.identity.uid == "u-1"
        assert settings.grpc_listen.port == 50051

    def test_leaves_the_pods_own_volumes_and_variables(self) -> None:
        spec = pod_spec(volumes=[{"name": "discovery-tmp", "emptyDir": {}}, {"name": "data", "emptyDir": {}}])
        spec["containers"][0]["env"] = [{"name": "DISCOVERY_GRPC_LISTEN", "value": "unix:///run/d.sock"}]
        result = injected(spec=spec)
        assert [v["name"] for v in result["volumes"]] == [
            "discovery-tmp",
            "data",
            "discovery-podinfo",
            "discovery-upstream-ca",
        ]
        assert result["volumes"][0] == {"name": "discovery-tmp", "emptyDir": {}}, "the pod's volume of that name stays"
        assert result["containers"][0]["env"] == [{"name": "DISCOVERY_GRPC_LISTEN", "value": "unix:///run/d.sock"}]

    def test_a_pod_declaring_the_sidecar_is_left_alone(self) -> None:
        for section in ("initContainers", "containers"):
            spec = pod_spec()
            spec[section] = [*spec.get(section, []), {"name": "discovery-sidecar", "image": "mine:1"}]
            assert inject_pod({}, spec, PARAMS, TEMPLATE) is None, section

    def test_injecting_twice_is_injecting_once(self) -> None:
        once = injected()
        assert inject_pod({}, once, PARAMS, TEMPLATE) is None

    def test_does_not_change_its_input(self) -> None:
        spec = pod_spec()
        before = copy.deepcopy(spec)
        injected(spec=spec)
        assert spec == before

    def test_copies_the_service_account_token_mount(self) -> None:
        """The ServiceAccount admission plugin mounted the token before the policy runs; the sidecar needs it."""
        mount = {"name": "kube-api-access-x1", "mountPath": TOKEN, "readOnly": True}
        spec = pod_spec()
        spec["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}, mount]
        mounts = injected(spec=spec)["initContainers"][0]["volumeMounts"]
        assert mounts[-1] == mount
        assert TOKEN not in [m["mountPath"] for m in injected()["initContainers"][0]["volumeMounts"]]

    def test_a_missing_parameter_is_named(self) -> None:
        params = {k: v for k, v in PARAMS.items() if k != "image"}
        with pytest.raises(ParameterError, match="'image'"):
            inject_pod({}, pod_spec(), params, TEMPLATE)


class TestSettings:
    def test_defaults_come_from_the_parameters(self) -> None:
        assert setting_values({}, PARAMS, TEMPLATE) == [
            ("DISCOVERY_ENDPOINTSLICE_SELECTOR", "nvidia.com/dynamo-discovery-enabled=true")
        ]

    def test_an_annotation_wins_over_the_default(self) -> None:
        values = dict(
            setting_values({PREFIX + "watch": "always", PREFIX + "peer-selector": "role=x"}, PARAMS, TEMPLATE)
        )
        assert values["DISCOVERY_WATCH"] == "always" and values["DISCOVERY_PEER_SELECTOR"] == "role=x"

    def test_one_readiness_source_set_by_the_pod_drops_the_others_defaults(self) -> None:
        """They exclude each other in the sidecar: the default selector must not join a pod's pod-selector."""
        values = dict(setting_values({PREFIX + "pod-selector": "app=w"}, PARAMS, TEMPLATE))
        assert values == {"DISCOVERY_POD_SELECTOR": "app=w"}

    def test_etcd_drops_the_kubernetes_only_defaults(self) -> None:
        values = dict(setting_values({PREFIX + "backend": "etcd"}, PARAMS, TEMPLATE))
        assert values == {"DYN_DISCOVERY_BACKEND": "etcd"}
        params = {**PARAMS, "backend": "etcd", "namespaces": "a,b"}
        assert dict(setting_values({}, params, TEMPLATE)) == {"DYN_DISCOVERY_BACKEND": "etcd"}

    def test_an_empty_annotation_leaves_the_variable_out(self) -> None:
        assert setting_values({PREFIX + "endpointslice-selector": ""}, PARAMS, TEMPLATE) == []

    def test_other_annotations_are_ignored(self) -> None:
        assert setting_values({"example.com/watch": "never", PREFIX + "inject": "x"}, PARAMS, TEMPLATE) == (
            setting_values({}, PARAMS, TEMPLATE)
        )


def run_inject(documents: list[dict[str, Any]], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    parsed = build_parser().parse_args(["inject", *args])
    out = io.StringIO()
    stdin = io.StringIO(yaml.safe_dump_all(documents))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = manifests.run(parsed, stdin, out)
    return code, [d for d in yaml.safe_load_all(out.getvalue()) if d], err.getvalue()


def workload(kind: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    pod = {"metadata": {"labels": labels or {"app": "w"}}, "spec": pod_spec()}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **pod["metadata"]}, "spec": pod["spec"]}
    if kind == "CronJob":
        return {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": pod}}},
        }
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "d"}, "spec": {"template": pod}}


class TestInjectCommand:
    @pytest.mark.parametrize("kind", ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"])
    def test_every_kind_of_pod_template_gets_the_sidecar(self, kind: str) -> None:
        code, (document,), _ = run_inject([workload(kind)])
        assert code == 0
        (pod,) = manifests.pod_templates(document)
        assert pod["spec"] == injected(spec=pod_spec())

    def test_lists_are_walked_and_other_documents_pass_unchanged(self) -> None:
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 1}]}}
        items = {"apiVersion": "v1", "kind": "List", "items": [workload("Pod"), workload("Deployment")]}
        code, (out_service, out_list), err = run_inject([service, items])
        assert code == 0 and out_service == service
        assert [len(list(manifests.pod_templates(i))) for i in out_list["items"]] == [1, 1]
        assert "2 pod template(s)" in err

    def test_a_pod_labelled_false_is_left_alone(self) -> None:
        document = workload("Deployment", {"app": "w", TEMPLATE.label: "false"})
        code, (out,), _ = run_inject([document])
        assert code == 0 and out == document

    def test_running_it_twice_changes_nothing_more(self) -> None:
        _, once, _ = run_inject([workload("Deployment")])
        _, twice, err = run_inject(once)
        assert twice == once and "0 pod template(s)" in err

    @pytest.mark.parametrize("kind", ["SidecarInjection", "ConfigMap"])
    def test_parameters_from_a_file_and_set(self, tmp_path: Any, kind: str) -> None:
        """--params takes the parameter object as installed (or a ConfigMap of the same data); --set wins."""
        params = policy.params_object(TEMPLATE) | {"kind": kind}
        params["data"] = {**params["data"], "image": "reg.example/sidecar:2", "watch": "always"}
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        code, (out,), _ = run_inject([workload("Pod")], "--params", str(path))
        assert code == 0 and sidecar_env(out["spec"])["DISCOVERY_WATCH"] == "always"
        code, (out,), _ = run_inject([workload("Pod")], "--params", str(path), "--set", "watch=never")
        sidecar = out["spec"]["initContainers"][0]
        assert code == 0 and sidecar["image"] == "reg.example/sidecar:2"
        assert sidecar_env(out["spec"])["DISCOVERY_WATCH"] == "never"

    @pytest.mark.parametrize(
        ("args", "message"),
        [(["--set", "imag=x"], "unknown injection parameter(s) imag"), (["--set", "image"], "KEY=VALUE")],
    )
    def test_bad_parameters_are_named(self, args: list[str], message: str) -> None:
        code, _, err = run_inject([workload("Pod")], *args)
        assert code == 2 and message in err

    def test_json_input_is_accepted(self) -> None:
        parsed = build_parser().parse_args(["inject"])
        out = io.StringIO()
        assert manifests.run(parsed, io.StringIO(json.dumps(workload("Pod"))), out) == 0
        assert "discovery-sidecar" in out.getvalue()

    def test_a_document_that_is_not_an_object_is_refused(self) -> None:
        parsed = build_parser().parse_args(["inject"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert manifests.run(parsed, io.StringIO("- a\n- b\n"), io.StringIO()) == 2
        assert "document 1 is not an object" in err.getvalue()


class TestGeneratedPolicy:
    def test_committed_files_are_what_the_generator_makes(self) -> None:
        """One source of truth: edit the template, then run python -m sidecar.app.injection.policy --write.

        The files are the ones the chart and kustomize ship (under the repository's root, not a copy beside
        the package: a wrong root once made this test compare the generator with its own stray output)."""
        repo = pathlib.Path(__file__).resolve().parents[2]
        for path, text in policy.rendered_files(TEMPLATE).items():
            assert path.is_relative_to(repo / "charts") or path.is_relative_to(repo / "manifests"), path
            stale = f"{path} is out of date: run python -m sidecar.app.injection.policy --write"
            assert path.read_text() == text, stale

    def test_the_policy_reads_every_setting_and_parameter(self) -> None:
        """Each setting's annotation and parameter, and each placeholder parameter, appear in the CEL."""
        for generated in policy.policies(TEMPLATE):
            text = json.dumps(generated)
            for setting in TEMPLATE.settings:
                assert TEMPLATE.annotation(setting) in text and setting.env in text
            for key in TEMPLATE.parameters:
                assert f'variables.params[\\"{key}\\"]' in text, key

    def test_the_policies_differ_only_in_name_and_selectors(self) -> None:
        """One patch, one match condition, one failure policy: the opt-ins are the only difference."""
        pods, namespaces = policy.policies(TEMPLATE)
        for generated in (pods, namespaces):
            generated["spec"]["matchConstraints"] = {
                "resourceRules": generated["spec"]["matchConstraints"]["resourceRules"]
            }
            del generated["metadata"]["name"]
        assert pods == namespaces
        assert pods["spec"]["failurePolicy"] == "Fail" and pods["spec"]["matchConditions"][0]["name"] == (
            "sidecar-not-declared"
        )

    def test_bindings_name_their_policy_and_read_the_pods_namespaces_parameters(self) -> None:
        for generated, binding in zip(policy.policies(TEMPLATE), policy.bindings(TEMPLATE), strict=True):
            assert binding["spec"]["policyName"] == generated["metadata"]["name"]
            assert binding["spec"]["paramRef"] == {"name": policy.PARAMS_NAME, "parameterNotFoundAction": "Deny"}
            constraints = dict(generated["spec"]["matchConstraints"])
            del constraints["resourceRules"]
            assert binding["spec"]["matchResources"] == constraints

    POD_LABELS = (None, "true", "false", "yes")
    NAMESPACE_LABELS = (None, "true", "false")

    @pytest.mark.parametrize("namespace_label", NAMESPACE_LABELS)
    @pytest.mark.parametrize("pod_label", POD_LABELS)
    def test_a_pod_is_matched_by_one_policy_if_it_opted_in_and_by_none_otherwise(
        self, pod_label: str | None, namespace_label: str | None
    ) -> None:
        """The selectors in each policy's own matchConstraints (what kube-apiserver checks before it looks at
        the policy's paramKind or bindings) decide, evaluated as the API server does: a pod that did not opt
        in is matched by no policy, so no broken or not-yet-ready policy can refuse it; a pod that did is
        matched by exactly one, so it never gets two sidecars."""
        pod = {} if pod_label is None else {TEMPLATE.label: pod_label}
        namespace = {} if namespace_label is None else {TEMPLATE.label: namespace_label}
        matching = [
            generated["metadata"]["name"]
            for generated in policy.policies(TEMPLATE)
            if selects(generated["spec"]["matchConstraints"].get("objectSelector"), pod)
            and selects(generated["spec"]["matchConstraints"].get("namespaceSelector"), namespace)
        ]
        opted_in = pod_label == "true" or (namespace_label == "true" and pod_label != "false")
        assert len(matching) == (1 if opted_in else 0), matching


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector's meaning (absent or empty selects everything; the parts AND)."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.get("matchExpressions") or ():
        key, operator, values = requirement["key"], requirement["operator"], requirement.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise AssertionError(f"unknown operator {operator}")
    return True


def test_cli_help_lists_inject() -> None:
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    assert "inject" in parser.format_help()
