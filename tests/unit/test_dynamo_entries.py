"""Tests for sidecar.core.dynamo_entries and the filters built on it: Dynamo's endpoint paths, the typed
endpoints and models read from a peer's data, and PeerFilter.endpoint / .model on the wire."""

from __future__ import annotations

from typing import Any

import pytest

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from sidecar.core.dynamo_entries import (
    DynamoEndpoint,
    DynamoModel,
    EndpointPath,
    EndpointPathError,
    dynamo_entries,
    parse_endpoint_path,
)
from sidecar.core.peer import Document, Peer, PeerState
from sidecar.serve.wire import encode_peer, filter_from_pb

GENERATE = EndpointPath("demo", "backend", "generate")


def endpoint_entry(path: EndpointPath = GENERATE, instance: int = 0x1B8F, **extra: Any) -> dict[str, Any]:
    return {
        "type": "Endpoint",
        "namespace": path.namespace,
        "component": path.component,
        "endpoint": path.endpoint,
        "instance_id": instance,
        "transport": {"tcp": f"10.0.0.1:9000/{instance:x}/{path}"},
    } | extra


def model_entry(name: str, path: EndpointPath = GENERATE, instance: int = 0x1B8F, **extra: Any) -> dict[str, Any]:
    return {
        "type": "Model",
        "namespace": path.namespace,
        "component": path.component,
        "endpoint": path.endpoint,
        "instance_id": instance,
        "card_json": {"display_name": name, "slug": name.lower()},
    } | extra


def peer_with(data: dict[str, Any], uid: str = "u1", labels: dict[str, str] | None = None) -> Peer:
    return Peer(
        uid=uid,
        name=f"pod-{uid}",
        namespace="ns",
        instance_id=0x1B8F,
        addresses=("10.0.0.1",),
        ports=(),
        labels=labels or {},
        state=PeerState.READY,
        document=Document(data),
    )


class TestEndpointPath:
    @pytest.mark.parametrize(
        "text",
        [
            "demo.backend.generate",
            "dyn://demo.backend.generate",
            "demo/backend/generate",
            " dyn://demo/backend.generate ",
        ],
    )
    def test_the_forms_dynamo_accepts(self, text: str) -> None:
        assert parse_endpoint_path(text) == GENERATE
        assert str(parse_endpoint_path(text)) == "demo.backend.generate"

    def test_extra_segments_join_the_endpoint_name_as_in_dynamo(self) -> None:
        assert parse_endpoint_path("dyn://ns.comp.a.b") == EndpointPath("ns", "comp", "a_b")

    @pytest.mark.parametrize("text", ["", "dyn://", "backend", "demo.backend", "demo..generate", "demo.backend."])
    def test_a_path_without_all_three_parts_is_refused(self, text: str) -> None:
        with pytest.raises(EndpointPathError, match="expected namespace.component.endpoint"):
            parse_endpoint_path(text)


class TestEntries:
    def test_endpoints_and_models_are_typed_and_sorted(self) -> None:
        other = EndpointPath("demo", "prefill", "generate")
        data = {
            "endpoints": {"b": endpoint_entry(other, 2), "a": endpoint_entry(GENERATE, 1)},
            "model_cards": {
                "m": model_entry("Llama", GENERATE, 1),
                "l": model_entry("Llama", GENERATE, 1, model_suffix="lora-a"),
            },
        }
        entries = dynamo_entries(data)
        assert entries.endpoints == (
            DynamoEndpoint(GENERATE, 1, "tcp", "10.0.0.1:9000/1/demo.backend.generate"),
            DynamoEndpoint(other, 2, "tcp", "10.0.0.1:9000/2/demo.prefill.generate"),
        )
        assert entries.models == (
            DynamoModel("Llama", GENERATE, 1, ""),
            DynamoModel("Llama", GENERATE, 1, "lora-a"),
        )
        assert entries.serves(GENERATE) and entries.serves(other)
        assert not entries.serves(EndpointPath("demo", "backend", "other"))
        assert entries.has_model("Llama") and not entries.has_model("llama")

    @pytest.mark.parametrize(
        "bad",
        [
            "not an object",
            {"type": "Model", "namespace": "demo", "component": "backend", "endpoint": "generate", "instance_id": 1},
            endpoint_entry(instance=-1),
            endpoint_entry(instance=True),
            endpoint_entry(namespace=""),
            endpoint_entry(component=None),
        ],
    )
    def test_entries_not_in_dynamos_shape_are_left_out_and_the_valid_ones_stay(self, bad: Any) -> None:
        data = {"endpoints": {"bad": bad, "good": endpoint_entry(instance=7)}}
        assert [e.instance_id for e in dynamo_entries(data).endpoints] == [7]

    @pytest.mark.parametrize(
        ("transport", "kind", "address"),
        [
            ({"nats_tcp": "namespace.demo.backend"}, "nats_tcp", "namespace.demo.backend"),
            ({"kind": "Nats", "config": {}}, "", ""),  # not a one-key object: the kind is unknown
            ({"http": {"url": "x"}}, "http", ""),
            ("tcp://x", "", ""),
        ],
    )
    def test_transport_kind_and_address(self, transport: Any, kind: str, address: str) -> None:
        (entry,) = dynamo_entries({"endpoints": {"k": endpoint_entry(transport=transport)}}).endpoints
        assert (entry.transport_kind, entry.transport_address) == (kind, address)

    @pytest.mark.parametrize("maps", [{}, {"endpoints": None, "model_cards": None}, {"endpoints": []}])
    def test_missing_null_or_odd_maps_mean_no_entries(self, maps: dict[str, Any]) -> None:
        entries = dynamo_entries(maps)
        assert entries.endpoints == () and entries.models == ()

    def test_a_card_without_a_display_name_is_not_a_model(self) -> None:
        card = model_entry("x", card_json={"slug": "x"})
        assert dynamo_entries({"model_cards": {"k": card}}).models == ()


class TestFilter:
    def request(self, **fields: Any) -> pb.PeerFilter:
        return pb.PeerFilter(**fields)

    def test_endpoint_filter_selects_unlabelled_peers_serving_it(self) -> None:
        serving = peer_with({"endpoints": {"k": endpoint_entry()}}, "a")
        other = peer_with({"endpoints": {"k": endpoint_entry(EndpointPath("demo", "backend", "clear"))}}, "b")
        empty = peer_with({}, "c")
        peer_filter = filter_from_pb(self.request(endpoint="dyn://demo.backend.generate"))
        assert [p.uid for p in (serving, other, empty) if peer_filter.groups_of(p, "self") is not None] == ["a"]

    def test_model_and_endpoint_and_selector_must_all_hold(self) -> None:
        data = {"endpoints": {"k": endpoint_entry()}, "model_cards": {"m": model_entry("Llama")}}
        labelled = peer_with(data, "a", {"role": "decode"})
        unlabelled = peer_with(data, "b")
        no_model = peer_with({"endpoints": {"k": endpoint_entry()}}, "c", {"role": "decode"})
        peer_filter = filter_from_pb(
            self.request(endpoint="demo.backend.generate", model="Llama", selector="role=decode")
        )
        chosen = [p.uid for p in (labelled, unlabelled, no_model) if peer_filter.groups_of(p, "self") is not None]
        assert chosen == ["a"]
        assert filter_from_pb(self.request(model="Llama")).groups_of(unlabelled, "self") == ()

    def test_a_bad_endpoint_is_an_invalid_argument_naming_the_field(self) -> None:
        with pytest.raises(ValueError, match=r"filter.endpoint: 'backend.generate' is not an endpoint path"):
            filter_from_pb(self.request(endpoint="backend.generate"))

    def test_the_peer_message_carries_the_typed_fields(self) -> None:
        data = {
            "endpoints": {"k": endpoint_entry(instance=0xABC)},
            "model_cards": {"m": model_entry("Llama", instance=0xABC, model_suffix="lora-a")},
        }
        message = encode_peer(peer_with(data))
        (endpoint,) = message.endpoints
        assert (endpoint.path, endpoint.namespace, endpoint.component, endpoint.endpoint) == (
            "demo.backend.generate",
            "demo",
            "backend",
            "generate",
        )
        assert (endpoint.instance_id, endpoint.instance_id_hex) == (0xABC, "abc")
        assert (endpoint.transport_kind, endpoint.transport_address) == (
            "tcp",
            "10.0.0.1:9000/abc/demo.backend.generate",
        )
        (model,) = message.models
        assert (model.name, model.path, model.instance_id, model.model_suffix) == (
            "Llama",
            "demo.backend.generate",
            0xABC,
            "lora-a",
        )

    def test_the_json_form_carries_them_too(self) -> None:
        data = {"endpoints": {"k": endpoint_entry(instance=5)}, "model_cards": {"m": model_entry("Llama", instance=5)}}
        as_json = peer_with(data).to_json_dict()
        assert as_json["endpoints"] == [
            {
                "path": "demo.backend.generate",
                "instance_id": 5,
                "transport_kind": "tcp",
                "transport_address": "10.0.0.1:9000/5/demo.backend.generate",
            }
        ]
        assert as_json["models"] == [
            {"name": "Llama", "path": "demo.backend.generate", "instance_id": 5, "model_suffix": ""}
        ]
