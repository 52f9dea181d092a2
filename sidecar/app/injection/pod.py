"""Add the sidecar to one pod spec, by the template's rules: the Python twin of the generated policy.

Pure (no IO): ``inject_pod`` takes a pod's metadata and spec and the parameter values and returns the
new spec, or ``None`` when the pod is left alone (it already declares the sidecar's container). What it
adds, and in which order, is exactly what the MutatingAdmissionPolicy's JSON patch adds (an integration
test creates the same pods both ways on a real API server and compares them):

1. the sidecar, first among the init containers, with the settings' variables after its own and the
   pod's service-account token mount (when one of its containers has it) after its own mounts;
2. the template's volumes the pod does not have yet (by name), after the pod's own;
3. the app containers' variables (``DISCOVERY_GRPC_LISTEN``) in every app container that does not set them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from sidecar.app.injection.template import Template


class ParameterError(ValueError):
    """A parameter the template needs is missing or unknown (names the key)."""


def declares_sidecar(spec: Mapping[str, Any], template: Template) -> bool:
    """Whether the pod already has a container (app or init) of the sidecar's name."""
    containers = [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]
    return any(c.get("name") == template.container_name for c in containers)


def setting_values(
    annotations: Mapping[str, str], params: Mapping[str, str], template: Template
) -> list[tuple[str, str]]:
    """(variable, value) for each setting that has a non-empty value, in the template's order.

    A pod's annotation wins; else the parameter (the cluster's default), unless the pod set another
    setting of the same group, or the setting is Kubernetes-only and the backend is etcd.
    """

    def annotated(key: str) -> bool:
        return template.annotation_prefix + key in annotations

    backend_key = template.backend_setting.key
    backend = (
        annotations[template.annotation_prefix + backend_key] if annotated(backend_key) else params.get(backend_key, "")
    )
    groups_set = {s.group for s in template.settings if s.group and annotated(s.key)}
    values = []
    for setting in template.settings:
        if annotated(setting.key):
            value = annotations[template.annotation(setting)]
        elif setting.group in groups_set or (setting.kubernetes_only and backend == "etcd"):
            value = ""
        else:
            value = params.get(setting.key, "")
        if value != "":
            values.append((setting.env, value))
    return values


def fill(node: Any, params: Mapping[str, str]) -> Any:
    """The template node with each ``{param: KEY}`` replaced by the parameter's value."""
    if isinstance(node, dict):
        if set(node) == {"param"}:
            key = node["param"]
            if key not in params or params[key] == "":
                raise ParameterError(f"the injection parameter {key!r} is not set")
            return params[key]
        return {k: fill(v, params) for k, v in node.items()}
    if isinstance(node, list):
        return [fill(v, params) for v in node]
    return node


def token_mounts(spec: Mapping[str, Any], template: Template) -> list[dict[str, Any]]:
    """The pod's service-account token mount, as the ServiceAccount admission plugin put it into its containers.

    That plugin runs before mutating admission policies, so it never sees the sidecar: the sidecar gets the
    same mount (read-only), found in the first app container that has it."""
    for container in spec.get("containers") or ():
        for mount in container.get("volumeMounts") or ():
            if mount.get("mountPath") == template.service_account_token_path:
                return [{"name": mount["name"], "mountPath": mount["mountPath"], "readOnly": True}]
    return []


def sidecar_container(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], params: Mapping[str, str], template: Template
) -> dict[str, Any]:
    container: dict[str, Any] = fill(copy.deepcopy(dict(template.sidecar)), params)
    annotations = metadata.get("annotations") or {}
    container["env"] = [
        *container.get("env", ()),
        *({"name": n, "value": v} for n, v in setting_values(annotations, params, template)),
    ]
    container["volumeMounts"] = [*container.get("volumeMounts", ()), *token_mounts(spec, template)]
    return container


def inject_pod(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], params: Mapping[str, str], template: Template
) -> dict[str, Any] | None:
    """The pod spec with the sidecar added, or None when the pod already declares it (left alone)."""
    if declares_sidecar(spec, template):
        return None
    new = copy.deepcopy(dict(spec))
    new["initContainers"] = [sidecar_container(metadata, spec, params, template), *(new.get("initContainers") or ())]
    have = {v.get("name") for v in new.get("volumes") or ()}
    added = [fill(copy.deepcopy(dict(v)), params) for v in template.volumes if v["name"] not in have]
    if added:
        new["volumes"] = [*(new.get("volumes") or ()), *added]
    for container in new.get("containers") or ():
        names = {e.get("name") for e in container.get("env") or ()}
        missing = [dict(e) for e in template.app_container_env if e["name"] not in names]
        if missing:
            container["env"] = [*(container.get("env") or ()), *missing]
    return new


def check_params(params: Mapping[str, str], template: Template) -> None:
    """Refuse keys the template does not know (a typo would otherwise be ignored silently)."""
    known = set(template.default_params())
    unknown = sorted(set(params) - known)
    if unknown:
        raise ParameterError(f"unknown injection parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
