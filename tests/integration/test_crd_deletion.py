"""Deleting a CRD on the dev control plane (``devcluster.crds``) without meeting the CRD finalizer's race.

A CRD deleted right after it was created, before anything used its storage, is the case that stalled for
minutes (``devcluster.crds`` says why): the finalizer's first attempt found the watch cache not yet
initialised and failed, then lost its retry. With ``delete_crds`` the first attempt must succeed, which a
watch on the CRD shows: no ``Terminating`` condition with reason ``InstanceDeletionFailed``, ever.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from devcluster.cluster import ControlPlane
from devcluster.crds import STALLED, delete_crds
from devcluster.waiting import wait_for
from sidecar.kube.api import KubeApi

pytestmark = pytest.mark.integration

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def gadget_crd(group: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": "Gadget", "listKind": "GadgetList", "plural": "gadgets", "singular": "gadget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def established(api: KubeApi, name: str) -> bool:
    conditions = (api.get(f"{CRDS}/{name}").get("status") or {}).get("conditions") or ()
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def test_a_crd_deleted_before_its_storage_was_used_goes_at_the_first_attempt(
    control_plane: ControlPlane, admin_api: KubeApi
) -> None:
    """Created, established and deleted with nothing using its storage in between (so the finalizer would
    be the first: without ``delete_crds``'s wait for the storage, its first attempt fails every time):
    every state the CRD passes through is watched; the finalizer works on it, never fails, and it is gone."""
    group = "cifix.example"
    name = f"gadgets.{group}"
    created = admin_api.create(CRDS, gadget_crd(group))
    wait_for(lambda: established(admin_api, name), 60, what=f"CRD {name} established")

    reasons: list[str] = []
    deleted = threading.Event()
    query = [
        ("watch", "1"),
        ("fieldSelector", f"metadata.name={name}"),
        ("resourceVersion", created["metadata"]["resourceVersion"]),
    ]
    stream = admin_api.stream(CRDS, query, read_timeout=120)

    def follow() -> None:
        for event in stream:
            conditions = (event["object"].get("status") or {}).get("conditions") or ()
            reasons.extend(c.get("reason", "") for c in conditions if c["type"] == "Terminating")
            if event["type"] == "DELETED":
                deleted.set()
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        delete_crds(control_plane, admin_api, [name], timeout=120)
        assert deleted.wait(30), "the watch saw no DELETED event"
    finally:
        stream.close()
        follower.join(10)
    assert "InstanceDeletionInProgress" in reasons, f"the watch missed the finalizer's work: {reasons}"
    assert STALLED not in reasons, reasons
