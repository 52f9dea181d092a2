"""Dynamo's container mode: several processes of one pod, each its own instance.

With ``DYN_KUBE_DISCOVERY_MODE=container`` every container of a pod that registers is an instance of
its own: its ``DynamoWorkerMetadata`` is named ``{pod}-{container}``, except the pod's *main* container,
which keeps the pod's identity (the CR named after the pod, and the pod's instance ID), so pod-mode and
container-mode readers agree on it. Readiness is the container's own (``containerStatuses[].ready``).

Facts from the released runtime (``ai-dynamo-runtime`` 1.6.1, checked by running it): the main
container is the one named ``main``; a container ``engine`` of pod ``w0`` registers ``w0-engine`` with
the instance ID of that name. Dynamo's main branch adds ``DYN_MAIN_CONTAINER_NAME`` (this process's main
container) and reads a remote pod's from its annotation ``nvidia.com/dynamo-main-container-name``; both
are honoured here and both default to ``main``, which is all 1.6.1 knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_MAIN_CONTAINER = "main"
MAIN_CONTAINER_ANNOTATION = "nvidia.com/dynamo-main-container-name"


def metadata_name(pod_name: str, container: str, main_container: str = DEFAULT_MAIN_CONTAINER) -> str:
    """The ``DynamoWorkerMetadata`` name of one container of a pod: the pod's own for its main container."""
    return pod_name if not container or container == main_container else f"{pod_name}-{container}"


def main_container_of(annotations: Mapping[str, Any]) -> str:
    """A (remote) pod's main container: its annotation when set, else ``main``; never this process's own."""
    value = annotations.get(MAIN_CONTAINER_ANNOTATION)
    name = value.strip() if isinstance(value, str) else ""
    return name or DEFAULT_MAIN_CONTAINER


def pod_peer_key(pod_uid: str, pod_name: str, metadata_name: str) -> str:
    """The peer's identity (``Peer.uid``): the pod UID for the pod's own identity, ``{uid}/{container}``
    for another container of it. Pod-mode and container-mode readers therefore name the main container's
    instance alike, and a container's instance never collides with its pod's."""
    if not metadata_name or metadata_name == pod_name:
        return pod_uid
    return f"{pod_uid}/{metadata_name.removeprefix(pod_name + '-')}"
