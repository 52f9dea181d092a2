"""manifests/examples/example-workload-etcd.yaml: accepted by a real API server, and its sidecar's
environment is a valid etcd-backend configuration (as the sidecar itself reads it)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from devcluster.cluster import ControlPlane
from sidecar.app.config import load_settings
from sidecar.etcd.settings import EtcdSettings
from tests.conftest import MANIFESTS, kubectl

pytestmark = pytest.mark.integration

MANIFEST = MANIFESTS / "examples" / "example-workload-etcd.yaml"


def deployment() -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert document["kind"] == "Deployment"
    return dict(document)


def test_the_api_server_accepts_it(control_plane: ControlPlane, namespace: str) -> None:
    output = kubectl(
        control_plane, "apply", "--dry-run=server", "--validate=strict", "-f", str(MANIFEST), namespace=namespace
    )
    assert "deployment.apps/dynamo-worker-etcd created (server dry run)" in output


def test_its_sidecar_environment_configures_the_etcd_backend(tmp_path: pathlib.Path) -> None:
    """What the kubelet would resolve (downward API, the Secret) is stood in for; the rest is literal."""
    spec = deployment()["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False  # no Kubernetes API access on this backend
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    stand_ins = {"metadata.name": "dynamo-worker-etcd-0", "metadata.namespace": "inference"}
    env = {"DISCOVERY_PODINFO_DIR": str(tmp_path)}
    for item in sidecar["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = stand_ins[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = f"secret-{item['valueFrom']['secretKeyRef']['key']}"
    settings = load_settings(environ=env)
    etcd = settings.backend_settings
    assert settings.backend == "etcd" and isinstance(etcd, EtcdSettings)
    assert etcd.endpoints_text == "http://etcd.dynamo-system.svc:2379"
    assert (etcd.lease_ttl, etcd.username) == (30, "secret-username")
    assert settings.grpc_listen.unix_path == "/run/discovery/discovery.sock"
    worker = spec["containers"][0]
    assert {e["name"]: e.get("value") for e in worker["env"]}["DISCOVERY_GRPC_LISTEN"] == env["DISCOVERY_GRPC_LISTEN"]
