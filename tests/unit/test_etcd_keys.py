"""Dynamo's etcd key layout: entries to keys (publishing) and etcd values to records (watching)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.core.dynamo_keys import (
    ENDPOINTS,
    EVENT_CHANNELS,
    MODEL_CARDS,
    BadValue,
    DocumentError,
    encode_segment,
    entry_problem,
    parse_kv,
    registration_keys,
    scope_path,
)

LEASE = 2687419807939130247  # a lease ID as Dynamo's etcd backend shows them (64-bit, not masked)


def endpoint(**overrides: Any) -> dict[str, Any]:
    entry = {
        "type": "Endpoint",
        "namespace": "demo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": 7758136932383685,
        "transport": {"tcp": "host:port/1b8ffc03f93bc5/demo/backend/generate"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }
    return {**entry, **overrides}


def test_encode_segment_is_dynamos_percent_encoding() -> None:
    assert encode_segment("kv-events_1") == "kv-events_1"
    assert encode_segment("kv/events.x") == "kv%2Fevents%2Ex"
    assert encode_segment("é") == "%C3%A9"


def test_scope_paths() -> None:
    assert scope_path({"kind": "namespace", "name": "ns/one"}) == "namespace/ns%2Fone"
    assert scope_path({"kind": "component", "namespace": "ns", "component": "w.c"}) == "namespace/ns/component/w%2Ec"
    assert (
        scope_path({"kind": "endpoint", "endpoint": {"namespace": "ns", "component": "c", "name": "a/*"}})
        == "namespace/ns/component/c/endpoint/a%2F%2A"
    )
    with pytest.raises(ValueError, match="scope.kind"):
        scope_path({"kind": "galaxy"})


def test_endpoint_and_model_entries_are_rekeyed_to_the_lease_and_their_instance_id_rewritten() -> None:
    document = {
        "endpoints": {"demo/backend/generate/1b8ffc03f93bc5": endpoint()},
        "model_cards": {
            "base": {"type": "Model", "namespace": "demo", "component": "backend", "endpoint": "generate",
                     "instance_id": 1, "card_json": {"display_name": "llama"}},
            "lora": {"type": "Model", "namespace": "demo", "component": "backend", "endpoint": "generate",
                     "instance_id": 1, "card_json": {}, "model_suffix": "adapter-a"},
        },
        "labels_that_etcd_has_no_place_for": {"x": 1},
    }
    keys = registration_keys(document, LEASE)
    hexid = f"{LEASE:x}"
    assert set(keys) == {
        f"v1/instances/demo/backend/generate/{hexid}",
        f"v1/mdc/demo/backend/generate/{hexid}",
        f"v1/mdc/demo/backend/generate/{hexid}/adapter-a",
    }
    value = json.loads(keys[f"v1/instances/demo/backend/generate/{hexid}"])
    assert value["instance_id"] == LEASE and value["transport"] == endpoint()["transport"]
    assert document["endpoints"]["demo/backend/generate/1b8ffc03f93bc5"]["instance_id"] == 7758136932383685  # untouched


def test_event_channels_and_sources_keep_their_publisher_ids() -> None:
    document = {
        "event_channels": {"c": {"type": "EventChannel", "scope": {"kind": "namespace", "name": "demo"},
                                 "topic": "kv events", "instance_id": 255, "transport": {"kind": "zmq"}}},
        "event_sources": {"s": {"type": "EventSource", "scope": {"kind": "namespace", "name": "demo"},
                                "topic": "kv", "publisher_id": 16, "metadata": {}}},
    }
    assert set(registration_keys(document, LEASE)) == {
        "v1/event_channels/namespace/demo/topic/kv%20events/ff",
        "v1/event_sources/namespace/demo/topic/kv/10",
    }


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"endpoints": {"e": {**endpoint(), "type": "Model"}}}, "type must be 'Endpoint'"),
        ({"endpoints": {"e": {k: v for k, v in endpoint().items() if k != "transport"}}}, "transport is missing"),
        ({"endpoints": {"e": endpoint(namespace=3)}}, "namespace must be a string"),
        ({"endpoints": ["not", "a", "map"]}, "endpoints must be a JSON object"),
        ({"endpoints": {"a": endpoint(), "b": endpoint()}}, "both register"),
        ({"event_channels": {"c": {"type": "EventChannel", "scope": {"kind": "namespace", "name": "d"},
                                   "topic": "t", "instance_id": -1, "transport": {}}}}, "unsigned 64-bit"),
        ({"endpoints": {"e": endpoint(card=float("nan"))}}, "Out of range float"),
    ],
)
def test_documents_dynamo_would_refuse_are_refused_with_the_entry_named(document: dict[str, Any], message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        registration_keys(document, LEASE)


def test_null_maps_are_empty() -> None:
    assert registration_keys({"endpoints": None, "model_cards": {}}, LEASE) == {}


def test_parse_kv_groups_by_lease_and_names_the_entry_by_its_key_under_the_bucket() -> None:
    value = json.dumps(endpoint(instance_id=LEASE)).encode()
    record = parse_kv(f"v1/instances/demo/backend/generate/{LEASE:x}".encode(), value, LEASE)
    assert record is not None
    assert (record.instance_id, record.kind, record.name) == (LEASE, "endpoints", f"demo/backend/generate/{LEASE:x}")
    assert record.entry["device_type"] == "cuda"
    assert parse_kv(b"v1/other/bucket", b"{}", LEASE) is None  # outside the four buckets: not ours


def test_a_key_without_lease_belongs_to_the_instance_its_value_names() -> None:
    record = parse_kv(b"v1/instances/demo/backend/generate/7", json.dumps(endpoint(instance_id=7)).encode(), 0)
    assert record is not None and record.instance_id == 7


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"v1/instances/a/b/c/1", b"not json {", "not JSON"),
        (b"v1/mdc/a/b/c/1", json.dumps(endpoint()).encode(), "type must be 'Model'"),
        (b"v1/instances/a/b/c/1", b"[1, 2]", "must be a JSON object"),
        (b"v1/instances/a/b/c/1", b"\xff\xfe", "not JSON"),
        (b"v1/instances/\xff", b"{}", "not UTF-8"),
        (b"v1/instances/a/b/c/1", json.dumps(endpoint(card="x" * 300_000)).encode(), "larger than 256 KiB"),
    ],
)
def test_bad_values_are_refused_with_a_reason(key: bytes, value: bytes, reason: str) -> None:
    with pytest.raises(BadValue, match=reason):
        parse_kv(key, value, LEASE)


def test_entry_problem_accepts_what_dynamo_writes() -> None:
    assert entry_problem(ENDPOINTS, endpoint()) is None
    assert entry_problem(MODEL_CARDS, {"type": "Model", "namespace": "n", "component": "c", "endpoint": "e",
                                       "instance_id": 1, "card_json": {}}) is None
    assert entry_problem(EVENT_CHANNELS, {"type": "EventChannel", "scope": {"kind": "namespace", "name": "n"},
                                          "topic": "t", "instance_id": 1, "transport": {}}) is None
