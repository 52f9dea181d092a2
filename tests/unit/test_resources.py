"""Tests for sidecar.core.resources: parsing EndpointSlices and DynamoWorkerMetadata CRs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.peer import PortInfo, canonical_json
from sidecar.core.resources import (
    object_key,
    parse_endpoint_slice,
    parse_pod,
    parse_worker_metadata,
    validate_worker_data,
)


def _slice(endpoints: list[Any], ports: list[Any] | None = None, **meta: Any) -> dict[str, Any]:
    metadata = {"name": "svc-abc", "namespace": "ns", "resourceVersion": "42", **meta}
    obj: dict[str, Any] = {"metadata": metadata, "addressType": "IPv4", "endpoints": endpoints}
    if ports is not None:
        obj["ports"] = ports
    return obj


def _endpoint(uid: str = "u1", name: str = "pod-1", conditions: Any = None, **extra: Any) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "uid": uid, "name": name}}
    if conditions is not None:
        ep["conditions"] = conditions
    ep.update(extra)
    return ep


# -- EndpointSlice -------------------------------------------------------------------------------------

CONDITION_CASES = [
    # conditions -> (ready, serving, terminating); an unset ready is not ready, as Dynamo reads it
    (None, (False, False, False)),
    ({}, (False, False, False)),
    ({"ready": True}, (True, True, False)),
    ({"ready": False}, (False, False, False)),
    ({"ready": False, "serving": True}, (False, True, False)),
    ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ({"ready": False, "terminating": True}, (False, False, True)),
    ({"serving": False}, (False, False, False)),
    ({"ready": None, "serving": None, "terminating": None}, (False, False, False)),
    ({"ready": True, "serving": True, "terminating": False}, (True, True, False)),
]


@pytest.mark.parametrize(("conditions", "expected"), CONDITION_CASES)
def test_condition_defaults(conditions: Any, expected: tuple[bool, bool, bool]) -> None:
    view = parse_endpoint_slice(_slice([_endpoint(conditions=conditions)]))
    (entry,) = view.endpoints
    assert (entry.ready, entry.serving, entry.terminating) == expected


def test_slice_fields() -> None:
    obj = _slice(
        [
            _endpoint(
                uid="u1", name="pod-1", addresses=["10.0.0.1", "10.0.0.2"], nodeName="n1", zone="z1", hostname="h1"
            )
        ],
        ports=[{"name": "grpc", "port": 9000, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}],
    )
    view = parse_endpoint_slice(obj)
    assert (view.name, view.namespace, view.resource_version) == ("svc-abc", "ns", "42")
    assert view.ports == (PortInfo(9000, "grpc", "TCP", "kubernetes.io/h2c"),)
    (entry,) = view.endpoints
    assert entry.pod_uid == "u1" and entry.pod_name == "pod-1"
    assert entry.addresses == ("10.0.0.1", "10.0.0.2")
    assert (entry.node_name, entry.zone, entry.hostname) == ("n1", "z1", "h1")


@pytest.mark.parametrize(
    "endpoint",
    [
        {"addresses": ["10.0.0.9"]},  # no targetRef at all
        {"addresses": ["10.0.0.9"], "targetRef": None},
        {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Node", "uid": "n", "name": "node"}},
        {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "p"}},  # no uid
        {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "uid": "", "name": "p"}},
        "not-an-object",
        None,
    ],
)
def test_endpoints_without_a_pod_target_are_skipped(endpoint: Any) -> None:
    view = parse_endpoint_slice(_slice([endpoint, _endpoint(uid="keep")]))
    assert [e.pod_uid for e in view.endpoints] == ["keep"]


def test_ports_without_a_number_are_skipped_and_defaults_filled() -> None:
    ports = [
        {"name": "all", "protocol": "TCP"},  # no port: "all ports"
        {"name": "nullport", "port": None},
        {"name": "text", "port": "80"},
        "garbage",
        {"port": 8080},
        {"name": "b", "port": 81, "protocol": "UDP"},
        {"name": "b", "port": 81, "protocol": "UDP"},  # duplicate collapses
    ]
    view = parse_endpoint_slice(_slice([_endpoint()], ports=ports))
    assert view.ports == (PortInfo(81, "b", "UDP", ""), PortInfo(8080, "", "TCP", ""))


def test_empty_and_missing_collections() -> None:
    view = parse_endpoint_slice({"metadata": {"name": "s", "namespace": "ns"}, "endpoints": None, "ports": None})
    assert view.endpoints == () and view.ports == ()
    assert view.resource_version == ""
    view = parse_endpoint_slice({})
    assert (view.name, view.namespace, view.endpoints, view.ports) == ("", "", (), ())


def test_non_string_addresses_are_dropped() -> None:
    view = parse_endpoint_slice(_slice([_endpoint(addresses=["10.0.0.1", 7, None, "fd00::1"])]))
    assert view.endpoints[0].addresses == ("10.0.0.1", "fd00::1")


def test_object_key() -> None:
    assert object_key({"metadata": {"name": "a", "namespace": "b"}}) == "b/a"
    assert object_key({}) == "/"
    assert object_key({"metadata": "junk"}) == "/"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "ready": st.none() | st.booleans(),
                "serving": st.none() | st.booleans(),
                "terminating": st.none() | st.booleans(),
            },
        ),
        max_size=5,
    )
)
def test_conditions_follow_kubernetes_defaults(all_conditions: list[dict[str, Any]]) -> None:
    endpoints = [_endpoint(uid=f"u{i}", conditions=c) for i, c in enumerate(all_conditions)]
    view = parse_endpoint_slice(_slice(endpoints))
    assert len(view.endpoints) == len(all_conditions)
    for entry, conditions in zip(view.endpoints, all_conditions, strict=True):
        ready = False if conditions.get("ready") is None else conditions["ready"]  # Dynamo's reading
        serving = ready if conditions.get("serving") is None else conditions["serving"]
        terminating = False if conditions.get("terminating") is None else conditions["terminating"]
        assert (entry.ready, entry.serving, entry.terminating) == (ready, serving, terminating)


# -- DynamoWorkerMetadata --------------------------------------------------------------------------------


def _cr(data: Any = None, *, spec: Any = "default", owners: Any = None, **meta: Any) -> dict[str, Any]:
    metadata = {"name": "pod-1", "namespace": "ns", "uid": "cr-uid", "resourceVersion": "7", **meta}
    if owners is not None:
        metadata["ownerReferences"] = owners
    obj: dict[str, Any] = {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoWorkerMetadata", "metadata": metadata}
    if spec == "default":
        obj["spec"] = {"data": data}
    elif spec is not None:
        obj["spec"] = spec
    return obj


def test_worker_metadata_fields() -> None:
    data = {"endpoints": {"ns/comp/ep/abc": {"x": 1}}, "model_cards": {}, "event_channels": {}, "custom": [1]}
    record = parse_worker_metadata(
        _cr(data, owners=[{"kind": "Pod", "uid": "pod-uid", "name": "pod-1"}], labels={"role": "decode"})
    )
    assert (record.name, record.namespace, record.uid, record.resource_version) == ("pod-1", "ns", "cr-uid", "7")
    assert record.owner_pod_uids == ("pod-uid",)
    assert record.labels == {"role": "decode"}
    assert record.data == data
    assert record.data["custom"] == [1]  # unknown keys are carried
    assert record.data_json == canonical_json(data)
    assert record.problem is None


def test_owner_pod_uids_only_from_pod_owners() -> None:
    owners = [
        {"kind": "Pod", "uid": "a"},
        {"kind": "ReplicaSet", "uid": "rs"},
        {"kind": "Pod", "uid": ""},
        {"kind": "Pod"},
        "junk",
        {"kind": "Pod", "uid": "b"},
    ]
    assert parse_worker_metadata(_cr({}, owners=owners)).owner_pod_uids == ("a", "b")
    assert parse_worker_metadata(_cr({})).owner_pod_uids == ()


@pytest.mark.parametrize(
    ("obj_kwargs", "fragment"),
    [
        ({"data": None}, "spec.data must be a JSON object"),
        ({"data": [1, 2]}, "got list"),
        ({"data": "text"}, "got str"),
        ({"data": 3}, "got int"),
        ({"data": {"endpoints": []}}, "spec.data.endpoints"),
        ({"data": {"model_cards": "x"}}, "spec.data.model_cards"),
        ({"data": {"event_channels": 7}}, "spec.data.event_channels"),
        ({"data": {"event_sources": ["x"]}}, "spec.data.event_sources"),
        ({"spec": None}, "spec is missing"),
        ({"spec": "junk"}, "spec is missing"),
        ({"spec": {}}, "spec.data must be a JSON object"),
    ],
)
def test_problem(obj_kwargs: dict[str, Any], fragment: str) -> None:
    record = parse_worker_metadata(_cr(**obj_kwargs))
    assert record.problem is not None and fragment in record.problem
    assert record.data is None
    assert record.data_json == ""


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"endpoints": {}},
        {"endpoints": {"a": 1}, "model_cards": {"m": {}}, "event_channels": {"e": None}},
        {"something_else": [1, "x"], "endpoints": {}},
        {"opaque": {"nested": {"deep": True}}},
    ],
)
def test_valid_data(data: dict[str, Any]) -> None:
    assert validate_worker_data(data) is None
    record = parse_worker_metadata(_cr(data))
    assert record.problem is None and record.data == data


def test_bad_labels_become_empty() -> None:
    assert parse_worker_metadata(_cr({}, labels="junk")).labels == {}
    assert parse_worker_metadata(_cr({})).labels == {}


def test_data_json_is_canonical() -> None:
    a = parse_worker_metadata(_cr({"b": 1, "a": {"y": 2, "x": 1}}))
    b = parse_worker_metadata(_cr({"a": {"x": 1, "y": 2}, "b": 1}))
    assert a.data_json == b.data_json == '{"a":{"x":1,"y":2},"b":1}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_validate_worker_data_agrees_with_the_rule(data: Any) -> None:
    problem = validate_worker_data(data)
    ok = isinstance(data, dict) and all(
        isinstance(data[k], dict) for k in ("endpoints", "model_cards", "event_channels") if k in data
    )
    assert (problem is None) == ok
    record = parse_worker_metadata(_cr(data))
    assert (record.problem is None) == ok
    assert record.problem == problem


def test_null_or_missing_dynamo_maps_are_empty_maps() -> None:
    """Dynamo reads each of its four maps as "null or missing = empty" (server-side apply stores a map whose
    last key was removed as null): such a CR is valid, and its null maps read as empty maps."""
    data = {"endpoints": None, "model_cards": {"m": {"type": "Model"}}, "event_channels": None, "other": None}
    record = parse_worker_metadata(_cr(data))
    assert record.problem is None
    assert record.data == {
        "endpoints": {},
        "model_cards": {"m": {"type": "Model"}},
        "event_channels": {},
        "other": None,
    }
    assert validate_worker_data({}) is None
    assert validate_worker_data({"event_sources": None}) is None


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("deep", "spec.data is nested deeper than 32 levels"),
        ({"big": "x" * (300 * 1024)}, "spec.data is larger than 256 KiB of JSON"),
        ({"n": [1.0, float("nan")]}, "spec.data contains nan, which is not a JSON number"),
        ({"n": {"x": float("inf")}}, "spec.data contains inf, which is not a JSON number"),
    ],
)
def test_metadata_beyond_the_bounds_is_a_problem(data: Any, fragment: str) -> None:
    """Depth, size and non-numbers are checked on every CR, so one pod's data cannot break the others'."""
    if data == "deep":
        data = {}
        inner = data
        for _ in range(40):
            inner["a"] = {}
            inner = inner["a"]
    record = parse_worker_metadata(_cr(data))
    assert record.problem == fragment or (record.problem or "").startswith(fragment)
    assert record.document is None


def test_metadata_at_the_depth_bound_is_valid_and_measured() -> None:
    """Exactly 32 levels pass; the record carries the estimated size for byte-bounded history."""
    data: dict[str, Any] = {}
    inner = data
    for _ in range(31):
        inner["a"] = {}
        inner = inner["a"]
    record = parse_worker_metadata(_cr(data))
    assert record.problem is None and record.document is not None
    assert record.document.size >= len(canonical_json(data))


def _pod(
    phase: str = "Running",
    ready: str = "True",
    ip: str | None = "10.0.0.5",
    deleting: bool = False,
    uid: str = "pod-uid",
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "w-0",
        "namespace": "ns",
        "uid": uid,
        "resourceVersion": "9",
        "labels": {"app": "w", "topology.kubernetes.io/zone": "z1"},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}, {"ip": "fd00::5"}]
    return {
        "metadata": meta,
        "spec": {
            "nodeName": "node-a",
            "containers": [
                {"name": "main", "ports": [{"name": "http", "containerPort": 8000}, {"containerPort": "x"}]}
            ],
        },
        "status": status,
    }


class TestParsePod:
    def test_ready_running_pod_with_an_ip_is_ready(self) -> None:
        """SMG's health rule: Ready true, phase Running, an IP; addresses, ports, node and zone carried."""
        record = parse_pod(_pod())
        (entry,) = record.endpoints
        assert (entry.pod_uid, entry.pod_name, entry.ready, entry.live) == ("pod-uid", "w-0", True, True)
        assert entry.addresses == ("10.0.0.5", "fd00::5")
        assert (entry.node_name, entry.zone) == ("node-a", "z1")
        assert record.ports == (PortInfo(8000, "http", "TCP", ""),)
        assert record.problem is None

    @pytest.mark.parametrize(
        "pod",
        [_pod(ready="False"), _pod(phase="Pending"), _pod(phase="Succeeded"), _pod(ip=None)],
        ids=["not-ready", "pending", "succeeded", "no-ip"],
    )
    def test_otherwise_not_live(self, pod: dict[str, Any]) -> None:
        """Any part of the rule missing: the pod is not a peer (yet, or any more)."""
        (entry,) = parse_pod(pod).endpoints
        assert not entry.ready and not entry.live

    def test_deleting_pod_that_still_serves_drains(self) -> None:
        """A deletionTimestamp on a serving pod: terminating and serving, so DRAINING, not gone mid-request."""
        (entry,) = parse_pod(_pod(deleting=True)).endpoints
        assert (entry.ready, entry.serving, entry.terminating, entry.live) == (False, True, True, True)

    def test_garbage_is_tolerated(self) -> None:
        """A pod without a UID is no endpoint; odd types never raise."""
        assert parse_pod(_pod(uid="")).endpoints == ()
        assert parse_pod({"metadata": "x", "spec": [], "status": 3}).endpoints == ()

    def test_pod_labels_and_annotations_are_kept(self) -> None:
        """The pod's own metadata rides in the entry (a peer without a CR is described by it); values that
        are not strings are dropped, not fatal."""
        pod = _pod()
        pod["metadata"]["annotations"] = {"smg.ai/worker-ports": "8080,8081", "odd": 3}
        pod["metadata"]["labels"]["bad"] = None
        (entry,) = parse_pod(pod).endpoints
        assert entry.pod is not None
        assert entry.pod.labels == {"app": "w", "topology.kubernetes.io/zone": "z1"}
        assert entry.pod.annotations == {"smg.ai/worker-ports": "8080,8081"}

    def test_endpoint_slices_know_no_pod_metadata(self) -> None:
        """An EndpointSlice does not carry the pod's labels: its entries say so (None), not 'no labels'."""
        (entry,) = parse_endpoint_slice(_slice([_endpoint()])).endpoints
        assert entry.pod is None
