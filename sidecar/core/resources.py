"""Parsers from the Kubernetes objects the sources watch to the join's records (``sidecar.core.records``).

The watch layer hands raw JSON dicts straight from the API server; these functions pick out what the
join needs and nothing else, so the join never touches raw objects and the rules for malformed input
live in one place. Nothing here raises on bad content: an EndpointSlice entry without a Pod
``targetRef`` is skipped, and a ``DynamoWorkerMetadata`` whose ``spec.data`` is unusable is returned with
``problem`` set, so the join can keep the last good metadata of that pod incarnation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.core.bounds import measure_metadata
from sidecar.core.containers import main_container_of, metadata_name
from sidecar.core.peer import Document, PortInfo
from sidecar.core.records import EndpointEntry, MetadataRecord, PodMeta, ReadinessRecord

DYNAMO_DATA_MAPS = ("endpoints", "model_cards", "event_channels", "event_sources")
"""The maps Dynamo puts in ``spec.data``: each a JSON object, or null/missing, which Dynamo reads as empty
(server-side apply stores a map whose last key was removed as null)."""


# The parsers below test ``isinstance(x, dict)``, not ``Mapping``: their input is decoded JSON, and the
# ABC check costs more than the rest of the parsing on the watch path.
def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` of a raw object, the key the stores index by."""
    meta = _meta(obj)
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _condition(conditions: Mapping[str, Any], name: str, default: bool) -> bool:
    """An EndpointConditions field; Kubernetes says an unset one means ``default`` (ready: true)."""
    value = conditions.get(name)
    return default if value is None else bool(value)


def parse_endpoint_slice(obj: Mapping[str, Any]) -> ReadinessRecord:
    meta = _meta(obj)
    ports = []
    for raw in obj.get("ports") or ():
        if not isinstance(raw, dict) or not isinstance(raw.get("port"), int):
            continue  # a port without a number ("all ports") carries nothing a peer can dial
        ports.append(
            PortInfo(
                port=raw["port"],
                name=raw.get("name") or "",
                protocol=raw.get("protocol") or "TCP",
                app_protocol=raw.get("appProtocol") or "",
            )
        )
    entries = []
    for raw in obj.get("endpoints") or ():
        if not isinstance(raw, dict):
            continue
        target = raw.get("targetRef") or {}
        if target.get("kind") != "Pod" or not target.get("uid"):
            continue  # only pod-backed endpoints can be joined with a pod's metadata
        conditions = raw.get("conditions") or {}
        # Kubernetes leaves an unset ``ready`` to the consumer; Dynamo reads it as not ready, and so must we,
        # or the two would disagree about a peer (the EndpointSlice controller always sets it).
        ready = _condition(conditions, "ready", False)
        entries.append(
            EndpointEntry(
                pod_uid=target["uid"],
                pod_name=target.get("name") or "",
                addresses=tuple(a for a in raw.get("addresses") or () if isinstance(a, str)),
                ready=ready,
                serving=_condition(conditions, "serving", ready),
                terminating=_condition(conditions, "terminating", False),
                node_name=raw.get("nodeName") or "",
                zone=raw.get("zone") or "",
                hostname=raw.get("hostname") or "",
            )
        )
    return ReadinessRecord(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        resource_version=meta.get("resourceVersion", ""),
        ports=tuple(sorted(set(ports))),
        endpoints=tuple(entries),
    )


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(value: Any) -> dict[str, str]:
    """A labels or annotations map with its non-string entries dropped (the API server never sends
    any, but a parser of untrusted input does not rely on that)."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _pod_condition(status: Mapping[str, Any], name: str) -> bool:
    for condition in status.get("conditions") or ():
        if isinstance(condition, dict) and condition.get("type") == name:
            return condition.get("status") == "True"
    return False


ZONE_LABEL = "topology.kubernetes.io/zone"


def _pod_addresses(status: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's IPs (``podIPs``, or the older single ``podIP``)."""
    return tuple(
        ip["ip"] for ip in status.get("podIPs") or () if isinstance(ip, dict) and isinstance(ip.get("ip"), str)
    ) or ((status["podIP"],) if isinstance(status.get("podIP"), str) and status["podIP"] else ())


def parse_pod(obj: Mapping[str, Any]) -> ReadinessRecord:
    """A Pod as readiness (pod-label discovery, as SGLang Model Gateway does it).

    The pod serves when its ``Ready`` condition is true, its phase is ``Running`` and it has an IP;
    with a ``deletionTimestamp`` it is terminating, so a serving pod then drains (``DRAINING``) instead
    of vanishing mid-request. Ports are the containers' declared ports. The pod's labels and
    annotations (string values only) go into the entry: they are the peer's own metadata when it has
    no CR, and where its workers' ports and model id come from.
    """
    meta = _meta(obj)
    spec = _dict(obj.get("spec"))
    status = _dict(obj.get("status"))
    addresses = _pod_addresses(status)
    serving = _pod_condition(status, "Ready") and status.get("phase") == "Running" and bool(addresses)
    terminating = bool(meta.get("deletionTimestamp"))
    ports = []
    for container in spec.get("containers") or ():
        for raw in (container.get("ports") or ()) if isinstance(container, dict) else ():
            if isinstance(raw, dict) and isinstance(raw.get("containerPort"), int):
                ports.append(
                    PortInfo(
                        port=raw["containerPort"], name=raw.get("name") or "", protocol=raw.get("protocol") or "TCP"
                    )
                )
    labels = _strings(meta.get("labels"))
    zone = labels.get(ZONE_LABEL, "")
    endpoints: tuple[EndpointEntry, ...] = ()
    if meta.get("uid"):
        entry = EndpointEntry(
            pod_uid=meta["uid"],
            pod_name=meta.get("name", ""),
            addresses=addresses,
            ready=serving and not terminating,
            serving=serving,
            terminating=terminating,
            node_name=spec.get("nodeName") or "",
            zone=zone if isinstance(zone, str) else "",
            hostname=spec.get("hostname") or "",
            pod=PodMeta(labels=labels, annotations=_strings(meta.get("annotations"))),
        )
        endpoints = (entry,)
    return ReadinessRecord(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        resource_version=meta.get("resourceVersion", ""),
        ports=tuple(sorted(set(ports))),
        endpoints=endpoints,
    )


def parse_pod_containers(obj: Mapping[str, Any]) -> ReadinessRecord:
    """A Pod as readiness in Dynamo's container mode: one entry per container, ready as its status says.

    Each entry names the metadata that speaks for it (``{pod}-{container}``, or the pod's own name for
    the pod's main container, from its annotation) and the container. Dynamo's rule is the container's
    ``ready`` alone (no phase, no draining); the pod needs a UID, as every join does.
    """
    meta = _meta(obj)
    spec = _dict(obj.get("spec"))
    status = _dict(obj.get("status"))
    addresses = _pod_addresses(status)
    pod_name = meta.get("name", "")
    main = main_container_of(_dict(meta.get("annotations")))
    labels = _strings(meta.get("labels"))
    zone = labels.get(ZONE_LABEL, "")
    pod = PodMeta(labels=labels, annotations=_strings(meta.get("annotations")))  # every container's pod
    entries = []
    for raw in status.get("containerStatuses") or () if meta.get("uid") and pod_name else ():
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            continue
        entries.append(
            EndpointEntry(
                pod_uid=meta["uid"],
                pod_name=pod_name,
                addresses=addresses,
                ready=raw.get("ready") is True,
                serving=False,
                terminating=False,
                node_name=spec.get("nodeName") or "",
                zone=zone if isinstance(zone, str) else "",
                hostname=spec.get("hostname") or "",
                container=raw["name"],
                metadata_name=metadata_name(pod_name, raw["name"], main),
                pod=pod,
            )
        )
    return ReadinessRecord(
        name=pod_name,
        namespace=meta.get("namespace", ""),
        resource_version=meta.get("resourceVersion", ""),
        ports=(),
        endpoints=tuple(sorted(entries, key=lambda e: e.container)),
    )


def validate_worker_data(data: Any) -> str | None:
    """Why ``spec.data`` is unusable, or None. Unknown content is opaque, and accepted within the bounds."""
    return _check_worker_data(data)[0]


def _check_worker_data(data: Any) -> tuple[str | None, int]:
    if not isinstance(data, Mapping):
        return f"spec.data must be a JSON object, got {type(data).__name__}", 0
    for key in DYNAMO_DATA_MAPS:
        value = data.get(key)
        if value is not None and not isinstance(value, Mapping):
            return f"spec.data.{key} must be a JSON object (Dynamo reads it as a map), got {type(value).__name__}", 0
    problem, size = measure_metadata(data)
    return (None if problem is None else f"spec.data {problem}"), size


def with_empty_maps(data: Mapping[str, Any]) -> dict[str, Any]:
    """Dynamo's maps that are null as empty maps, as Dynamo reads them (the rest untouched).

    Peers carry a CR's data in this form, and so do ``GetSelf`` and the ``PublishMetadata`` reply: all three
    are the stored object read through this one function, so they agree.
    """
    if all(data.get(key, ()) is not None for key in DYNAMO_DATA_MAPS):
        return data if isinstance(data, dict) else dict(data)
    return {**data, **{key: {} for key in DYNAMO_DATA_MAPS if key in data and data[key] is None}}


def parse_worker_metadata(obj: Mapping[str, Any]) -> MetadataRecord:
    meta = _meta(obj)
    owners = tuple(
        ref["uid"]
        for ref in meta.get("ownerReferences") or ()
        if isinstance(ref, dict) and ref.get("kind") == "Pod" and ref.get("uid")
    )
    spec = obj.get("spec")
    data = spec.get("data") if isinstance(spec, dict) else None
    error, size = ("spec is missing", 0) if not isinstance(spec, dict) else _check_worker_data(data)
    raw_labels = meta.get("labels")
    labels: Mapping[str, str] = raw_labels if isinstance(raw_labels, dict) else {}
    return MetadataRecord(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        uid=meta.get("uid", ""),
        resource_version=meta.get("resourceVersion", ""),
        owner_pod_uids=owners,
        labels=dict(labels),
        document=Document(with_empty_maps(data), size) if error is None and isinstance(data, dict) else None,
        problem=error,
    )
