"""Tests for sidecar.core.dynamo_schema: what Dynamo 1.6.1 would refuse is refused at publish, by name."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core.dynamo_schema import dynamo_metadata_problem, entry_problem

ENDPOINT: dict[str, Any] = {
    "type": "Endpoint",
    "namespace": "demo",
    "component": "backend",
    "endpoint": "generate",
    "instance_id": 7758136932383685,
    "transport": {"tcp": "host:port/1b8ffc03f93bc5/demo/backend/generate"},
    "device_type": "cuda",
    "request_plane_codec": "msgpack",
}
ENDPOINT_KEY = "demo/backend/generate/1b8ffc03f93bc5"
MODEL: dict[str, Any] = {
    "type": "Model",
    "namespace": "demo",
    "component": "backend",
    "endpoint": "generate",
    "instance_id": 42,
    "card_json": {"display_name": "Qwen/Qwen3-0.6B"},
    "model_suffix": None,
}
CHANNEL: dict[str, Any] = {
    "type": "EventChannel",
    "namespace": "dynamo",
    "component": "",
    "topic": "kv_metrics",
    "instance_id": 42,
    "transport": {"kind": "Nats", "config": {"subject_prefix": "namespace.dynamo"}},
}

# An event channel and its source exactly as ai-dynamo-runtime 1.6.1 wrote them into a worker's CR (a
# KvEventPublisher on the ZMQ event plane, captured from the real runtime on the real control plane):
# a scope object beside the legacy namespace/component, keyed by the scope's path.
SCOPED_KEY = "namespace/demo/component/backend/endpoint/generate/topic/kv-events/1b14f4374f2d30"
SCOPED_CHANNEL: dict[str, Any] = {
    "component": "backend",
    "instance_id": 7622863503699248,
    "namespace": "demo",
    "scope": {"endpoint": {"component": "backend", "name": "generate", "namespace": "demo"}, "kind": "endpoint"},
    "topic": "kv-events",
    "transport": {"config": {"endpoint": "tcp://192.0.2.2:46393"}, "kind": "Zmq"},
    "type": "EventChannel",
}
SCOPED_SOURCE: dict[str, Any] = {
    "metadata": {
        "kv_state_endpoint": {"component": "backend", "name": "generate", "namespace": "demo"},
        "publisher_id": 7622863503699248,
        "worker": {"dp_rank": 0, "worker_id": 6209814259985326},
    },
    "publisher_id": 7622863503699248,
    "scope": {"endpoint": {"component": "backend", "name": "generate", "namespace": "demo"}, "kind": "endpoint"},
    "topic": "kv-events",
    "type": "EventSource",
}


class TestWhatDynamoWrites:
    def test_the_runtimes_own_entries_pass(self) -> None:
        """The 1.6.1 runtime's entries (DESIGN.md's example and Dynamo's fixture shapes), extras and all."""
        data = {
            "endpoints": {ENDPOINT_KEY: ENDPOINT},
            "model_cards": {
                "demo/backend/generate/2a": MODEL,
                "demo/backend/generate/2a/lora-1": {**MODEL, "model_suffix": "lora-1"},
            },
            "event_channels": {"dynamo//kv_metrics/2a": CHANNEL},
            "event_sources": {"anything": {"type": "EventSource", "future": True}},
            "other": {"opaque": [1, 2]},
        }
        assert dynamo_metadata_problem(data) is None

    def test_null_or_missing_maps_are_empty(self) -> None:
        """Dynamo reads null or missing maps as empty; so does the check."""
        assert dynamo_metadata_problem({"endpoints": None}) is None
        assert dynamo_metadata_problem({}) is None


class TestWhatDynamoRefuses:
    @pytest.mark.parametrize(
        ("change", "fragment"),
        [
            ({"component": None}, "spec.data.endpoints['demo/backend/generate/1b8ffc03f93bc5'].component is missing"),
            ({"type": "Model"}, ".type must be 'Endpoint'"),
            ({"instance_id": "1b8f"}, ".instance_id must be an unsigned 64-bit integer, got str"),
            ({"instance_id": -1}, ".instance_id must be an unsigned 64-bit integer"),
            ({"instance_id": True}, ".instance_id must be an unsigned 64-bit integer"),
            ({"transport": "tcp://x"}, ".transport must be an object with one key, the transport kind"),
            # An externally tagged enum in Dynamo: {} does not decode (the 1.6.1 runtime drops the whole CR).
            ({"transport": {}}, ".transport must be an object with one key, the transport kind (e.g. {\"tcp\""),
            ({"transport": {"tcp": "a", "nats_tcp": "b"}}, "got an object with 2 keys"),
            ({"endpoint": "other"}, "the key must be 'demo/backend/other/1b8ffc03f93bc5'"),
        ],
    )
    def test_endpoint_entries(self, change: dict[str, Any], fragment: str) -> None:
        """Each required field and its type, and a key that agrees with the entry; the entry is named."""
        entry = {k: v for k, v in {**ENDPOINT, **change}.items() if v is not None}
        problem = dynamo_metadata_problem({"endpoints": {ENDPOINT_KEY: entry}})
        assert problem is not None and fragment in problem

    def test_model_without_a_card_and_a_bad_suffix(self) -> None:
        """card_json must be present (any JSON); model_suffix a string or null, and part of the key."""
        no_card = {k: v for k, v in MODEL.items() if k != "card_json"}
        assert "card_json is missing" in (entry_problem("model_cards", "demo/backend/generate/2a", no_card) or "")
        bad_suffix = {**MODEL, "model_suffix": 3}
        assert "model_suffix must be a string or null" in (
            entry_problem("model_cards", "demo/backend/generate/2a", bad_suffix) or ""
        )
        with_suffix = {**MODEL, "model_suffix": "lora"}
        assert "must be 'demo/backend/generate/2a/lora'" in (
            entry_problem("model_cards", "demo/backend/generate/2a", with_suffix) or ""
        )

    def test_event_channel_key_uses_the_topic_and_event_sources_need_their_tag(self) -> None:
        """Event channels are keyed by topic; event sources are only checked for their tag."""
        assert entry_problem("event_channels", "dynamo//kv_metrics/2a", CHANNEL) is None
        assert "the key must be" in (entry_problem("event_channels", "dynamo/x/kv_metrics/2a", CHANNEL) or "")
        assert ".type must be 'EventSource'" in (entry_problem("event_sources", "k", {"type": "Endpoint"}) or "")
        assert "must be a JSON object, got list" in (entry_problem("endpoints", "k", [1]) or "")


class TestScopedEventChannels:
    def test_what_the_1_6_1_runtime_writes_passes(self) -> None:
        """Refused before: the old check wanted the key namespace/component/topic/id."""
        data = {"event_channels": {SCOPED_KEY: SCOPED_CHANNEL}, "event_sources": {SCOPED_KEY: SCOPED_SOURCE}}
        assert dynamo_metadata_problem(data) is None

    def test_etcds_shape_without_the_legacy_fields_passes(self) -> None:
        """On etcd the runtime writes the scope alone (no namespace/component)."""
        bare = {k: v for k, v in SCOPED_CHANNEL.items() if k not in ("namespace", "component")}
        assert entry_problem("event_channels", SCOPED_KEY, bare) is None

    @pytest.mark.parametrize(
        ("key", "change", "fragment"),
        [
            ("namespace/demo/topic/kv-events/1b14f4374f2d30", {}, "the key must be " + repr(SCOPED_KEY)),
            (SCOPED_KEY, {"scope": {"kind": "galaxy"}}, "scope.kind must be namespace, component or endpoint"),
            (SCOPED_KEY, {"topic": 3}, ".topic must be a string"),
            (SCOPED_KEY, {"instance_id": -1}, ".instance_id must be an unsigned 64-bit integer"),
            (SCOPED_KEY, {"transport": None}, ".transport is missing"),
            (SCOPED_KEY, {"type": "EventSource"}, ".type must be 'EventChannel'"),
        ],
    )
    def test_what_dynamo_would_refuse(self, key: str, change: dict[str, Any], fragment: str) -> None:
        problem = entry_problem("event_channels", key, {**SCOPED_CHANNEL, **change})
        assert problem is not None and fragment in problem, problem
