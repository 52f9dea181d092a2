"""Tests for sidecar.serve.wire's request validation: strict JSON and known publish modes."""

from __future__ import annotations

import pytest

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from sidecar.serve.wire import document_from_publish


class TestPublishDocument:
    @pytest.mark.parametrize(
        ("data_json", "fragment"),
        [
            ('{"a": NaN}', "contains NaN, which is not a JSON number"),
            ('{"a": [-Infinity]}', "contains -Infinity, which is not a JSON number"),
            ('{"a": 1e400}', "contains 1e400, which is out of the range"),
            ("[" * 5000 + "]" * 5000, "nested too deeply"),
            ('{"a": 1', "not valid JSON"),
            ("[1]", "must be a JSON object, got list"),
        ],
    )
    def test_not_strict_json_is_invalid(self, data_json: str, fragment: str) -> None:
        """JSON has no NaN or Infinity, and a double has a range: such documents are refused, not stored as
        strings or infinities; nesting past the stack is an error, not a crash."""
        with pytest.raises(ValueError, match=fragment):
            document_from_publish(pb.PublishMetadataRequest(data_json=data_json))

    def test_unknown_mode_is_refused(self) -> None:
        """A mode from a newer client is not silently taken for REPLACE."""
        with pytest.raises(ValueError, match="mode 7 is not a PublishMode"):
            document_from_publish(pb.PublishMetadataRequest(data_json="{}", mode=7))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "mode", [pb.PUBLISH_MODE_UNSPECIFIED, pb.PUBLISH_MODE_REPLACE, pb.PUBLISH_MODE_MERGE_PATCH]
    )
    def test_known_modes_and_ordinary_numbers_pass(self, mode: pb.PublishMode) -> None:
        """Finite floats, big integers and all three modes go through unchanged."""
        document = document_from_publish(
            pb.PublishMetadataRequest(data_json='{"x": 1.5, "n": 12345678901234567890}', mode=mode)
        )
        assert document == {"x": 1.5, "n": 12345678901234567890}


class TestWorkers:
    def test_workers_are_typed_fields_with_bootstrap_presence(self) -> None:
        """Peer.workers (field 18): a bootstrap port is present only when the pod gave one."""
        from sidecar.core.peer import Document, Peer, PeerState
        from sidecar.core.workers import Worker
        from sidecar.serve.wire import encode_peer, peer_from_pb_json

        peer = Peer(
            uid="u",
            name="w-0",
            namespace="ns",
            instance_id=1,
            addresses=("10.0.0.1",),
            ports=(),
            labels={},
            state=PeerState.READY,
            document=Document({}),
            workers=(
                Worker("http://10.0.0.1:8080", 8080, "http", 8998, "m", "Nixl", "e-1"),
                Worker("http://10.0.0.1:8081", 8081, "http"),
            ),
        )
        message = pb.Peer.FromString(encode_peer(peer).SerializeToString())
        first, second = message.workers
        assert (first.url, first.port, first.protocol, first.model_id) == ("http://10.0.0.1:8080", 8080, "http", "m")
        assert first.HasField("bootstrap_port") and first.bootstrap_port == 8998
        assert (first.kv_connector, first.kv_engine_id) == ("Nixl", "e-1")
        assert not second.HasField("bootstrap_port")
        assert peer_from_pb_json(message)["workers"][1] == {
            "url": "http://10.0.0.1:8081",
            "port": 8081,
            "protocol": "http",
            "model_id": "",
            "kv_connector": "",
            "kv_engine_id": "",
        }
