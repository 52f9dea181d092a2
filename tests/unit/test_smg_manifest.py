"""Tests for sidecar.core.smg_manifest: the peer set as SGLang Model Gateway's worker manifest."""

from __future__ import annotations

import json

import pytest

from sidecar.core.peer import Document, Peer, PeerState
from sidecar.core.selectors import SelectorError, parse_selector
from sidecar.core.smg_manifest import SmgRoles, manifest_text, parse_smg_selector, smg_manifest
from sidecar.core.workers import Worker


def peer(uid: str, labels: dict[str, str], *workers: Worker, state: PeerState = PeerState.READY) -> Peer:
    return Peer(
        uid=uid,
        name=f"pod-{uid}",
        namespace="ns",
        instance_id=1,
        addresses=(),
        ports=(),
        labels=labels,
        state=state,
        document=Document({}),
        workers=workers,
    )


def w(url_host: str, port: int = 8000, bootstrap: int | None = None, model: str = "") -> Worker:
    return Worker(f"http://{url_host}:{port}", port, "http", bootstrap, model)


PD = SmgRoles(
    prefill=parse_selector("role=prefill"),
    decode=parse_selector("role=decode"),
    encode=parse_selector("role=encode"),
    regular=parse_selector("app=w"),
)


class TestRoles:
    @pytest.mark.parametrize(
        ("labels", "role"),
        [
            ({"role": "prefill"}, "prefill"),
            ({"role": "decode", "app": "w"}, "decode"),
            ({"app": "w"}, "regular"),
            ({"app": "other"}, None),
        ],
    )
    def test_first_matching_role(self, labels: dict[str, str], role: str | None) -> None:
        assert PD.role(labels) == role

    def test_encode_prefill_decode_order(self) -> None:
        """A pod matching several role selectors takes SMG's first: encode, then prefill, then decode."""
        roles = SmgRoles(prefill=parse_selector("a=1"), decode=parse_selector("a=1"), encode=parse_selector("b=1"))
        assert roles.role({"a": "1"}) == "prefill"
        assert roles.role({"a": "1", "b": "1"}) == "encode"


class TestManifest:
    def test_schema_and_order(self) -> None:
        """version 1, workers sorted by URL, each with SMG's own id ({pod UID}:{port}); bootstrap ports for
        prefill/encode only; model id when known."""
        doc = smg_manifest(
            [
                peer("b", {"role": "decode"}, w("10.0.0.2", bootstrap=9000)),
                peer("a", {"role": "prefill"}, w("10.0.0.1", bootstrap=8998, model="m")),
                peer("c", {"app": "w"}, w("10.0.0.3", 8080), w("10.0.0.3", 8081)),
            ],
            PD,
        )
        assert doc == {
            "version": 1,
            "workers": [
                {
                    "id": "a:8000",
                    "url": "http://10.0.0.1:8000",
                    "worker_type": "prefill",
                    "bootstrap_port": 8998,
                    "model_id": "m",
                },
                {"id": "b:8000", "url": "http://10.0.0.2:8000", "worker_type": "decode"},
                {"id": "c:8080", "url": "http://10.0.0.3:8080", "worker_type": "regular"},
                {"id": "c:8081", "url": "http://10.0.0.3:8081", "worker_type": "regular"},
            ],
        }

    def test_draining_and_unselected_peers_are_left_out(self) -> None:
        """SMG drops a deleting pod at once (it drains the worker itself): DRAINING peers are not listed."""
        doc = smg_manifest(
            [peer("a", {"app": "w"}, w("10.0.0.1"), state=PeerState.DRAINING), peer("b", {"x": "y"}, w("10.0.0.2"))],
            PD,
        )
        assert doc == {"version": 1, "workers": []}

    def test_one_entry_per_url(self) -> None:
        """An address handed to a new pod before the old pod's status changed: one entry, stable choice."""
        doc = smg_manifest([peer("z", {"app": "w"}, w("10.0.0.1")), peer("a", {"role": "decode"}, w("10.0.0.1"))], PD)
        assert doc["workers"] == [{"id": "a:8000", "url": "http://10.0.0.1:8000", "worker_type": "decode"}]

    def test_text_is_stable(self) -> None:
        peers = [peer("a", {"app": "w"}, w("10.0.0.1")), peer("b", {"app": "w"}, w("10.0.0.2"))]
        text = manifest_text(smg_manifest(peers, PD))
        assert text == manifest_text(smg_manifest(list(reversed(peers)), PD))
        assert json.loads(text)["version"] == 1 and text.endswith("\n")


class TestSelectorSpelling:
    def test_smg_space_separated(self) -> None:
        assert parse_smg_selector("app=sglang  role=prefill") == parse_selector("app=sglang,role=prefill")

    def test_kubernetes_syntax(self) -> None:
        assert parse_smg_selector("role in (a,b)") == parse_selector("role in (a,b)")

    def test_bad(self) -> None:
        with pytest.raises(SelectorError):
            parse_smg_selector("role=a b")

    def test_a_new_incarnation_at_the_same_url_is_a_new_worker(self) -> None:
        """Same pod name, same address, new UID: the id changes, so SMG re-registers instead of keeping the
        old incarnation's worker."""
        before = smg_manifest([peer("uid-1", {"app": "w"}, w("10.0.0.1"))], PD)["workers"][0]
        after = smg_manifest([peer("uid-2", {"app": "w"}, w("10.0.0.1"))], PD)["workers"][0]
        assert before["url"] == after["url"] and before["id"] != after["id"]

    def test_kv_annotations_pass_through(self) -> None:
        worker = Worker("http://10.0.0.1:8000", 8000, "http", kv_connector="NixlConnector", kv_engine_id="e-7")
        (entry,) = smg_manifest([peer("a", {"app": "w"}, worker)], PD)["workers"]
        assert (entry["kv_connector"], entry["kv_engine_id"]) == ("NixlConnector", "e-7")
