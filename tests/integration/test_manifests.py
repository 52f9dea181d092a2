"""The manifests are accepted by a real API server, and the example workload is wired up consistently.

Every manifest is applied with a server-side dry run (schema, strict field validation and admission)
and then for real into a fresh namespace; applying again changes nothing, including the cluster-scoped
CRD and admission policy that the session already installed. There is no kubelet or scheduler, so the
Deployment's pods never run: instead a pod built from its template goes through the API server's
admission (server-side dry run), the ServiceAccount's permissions are asked of the authorizer, and the
sidecar's own configuration loader reads the container's environment and downward-API files.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest
import yaml

from devcluster.cluster import ControlPlane
from sidecar.config import OPTIONS, OPTIONS_BY_ENV, load_settings
from tests.conftest import MANIFESTS, kubectl

pytestmark = pytest.mark.integration

MANIFEST_FILES = ("crd.yaml", "rbac.yaml", "admission-policy.yaml", "example-workload.yaml")
CLUSTER_SCOPED = (
    ("customresourcedefinition", "dynamoworkermetadatas.nvidia.com"),
    ("validatingadmissionpolicy", "dynamoworkermetadata-own-pod-only"),
    ("validatingadmissionpolicybinding", "dynamoworkermetadata-own-pod-only"),
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


def _documents(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _workload() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = {d["kind"]: d for d in _documents(MANIFESTS / "example-workload.yaml")}
    assert set(docs) == {"Service", "Deployment"}, sorted(docs)
    return docs["Service"], docs["Deployment"]


def _generations(plane: ControlPlane) -> dict[str, int]:
    found = {}
    for kind, name in CLUSTER_SCOPED:
        obj = json.loads(kubectl(plane, "get", kind, name, "-o", "json", "--output-no-warnings"
                                 if False else "--show-managed-fields=false"))
        found[f"{kind}/{name}"] = obj["metadata"]["generation"]
    return found


def _get_json(plane: ControlPlane, *args: str, namespace: str | None = None) -> dict[str, Any]:
    argv = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}"]
    del argv  # kubectl() merges stderr into its result; keep the JSON clean by asking for stdout only
    import subprocess

    result = subprocess.run(
        [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *([f"--namespace={namespace}"] if namespace else []),
         *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return json.loads(result.stdout)
