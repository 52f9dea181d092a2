"""Tests for sidecar.core.workers: a peer's serving processes from its pod and the sidecar's settings."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.workers import (
    BOOTSTRAP_PORT_ANNOTATION,
    KV_CONNECTOR_ANNOTATION,
    KV_ENGINE_ID_ANNOTATION,
    WORKER_PORTS_ANNOTATION,
    ModelIdFrom,
    PodView,
    Worker,
    WorkerPolicy,
    pod_workers,
)


def view(annotations: dict[str, str] | None = None, **kwargs: Any) -> PodView:
    values: dict[str, Any] = {"address": "10.0.0.5", "namespace": "inference", "labels": {"model": "llama"}}
    values.update(kwargs)
    return PodView(annotations=annotations or {}, **values)


def urls(workers: tuple[Worker, ...]) -> list[str]:
    return [w.url for w in workers]


class TestPorts:
    def test_the_setting_gives_one_worker(self) -> None:
        """DISCOVERY_WORKER_PORT: one worker at the pod IP, as smg --service-discovery-port."""
        workers, problems = pod_workers(view(), WorkerPolicy(port=8000))
        assert workers == (Worker("http://10.0.0.5:8000", 8000, "http"),) and problems == ()

    def test_the_annotation_wins_one_worker_per_port(self) -> None:
        """smg.ai/worker-ports: one worker per port, in order, duplicates dropped."""
        workers, _ = pod_workers(view({WORKER_PORTS_ANNOTATION: "8081, 8080,8081"}), WorkerPolicy(port=8000))
        assert urls(workers) == ["http://10.0.0.5:8081", "http://10.0.0.5:8080"]

    def test_without_setting_or_annotation_the_one_declared_port(self) -> None:
        """Nothing configured: a pod declaring exactly one port serves there; several ports say nothing."""
        assert urls(pod_workers(view(declared_ports=[9000]), WorkerPolicy())[0]) == ["http://10.0.0.5:9000"]
        assert pod_workers(view(declared_ports=[9000, 9001]), WorkerPolicy()) == ((), ())

    @pytest.mark.parametrize("bad", ["nope", "0", "70000", "-1", "80a", ""])
    def test_a_bad_entry_skips_that_worker_only(self, bad: str) -> None:
        """A bad port is skipped and reported; the others stay (never a crash, never a guessed port)."""
        workers, problems = pod_workers(view({WORKER_PORTS_ANNOTATION: f"8080,{bad}"}), WorkerPolicy(port=8000))
        assert urls(workers) == ["http://10.0.0.5:8080"]
        assert len(problems) == 1 and WORKER_PORTS_ANNOTATION in problems[0] and repr(bad) in problems[0]

    def test_grpc_and_ipv6(self) -> None:
        """The scheme is the protocol setting; an IPv6 address is bracketed."""
        (worker,), _ = pod_workers(view(address="fd00::5"), WorkerPolicy(port=50051, protocol="grpc"))
        assert (worker.url, worker.protocol) == ("grpc://[fd00::5]:50051", "grpc")

    def test_no_address_no_workers(self) -> None:
        assert pod_workers(view(address=""), WorkerPolicy(port=8000)) == ((), ())


class TestBootstrapPorts:
    def test_one_value_for_every_worker(self) -> None:
        workers, _ = pod_workers(
            view({WORKER_PORTS_ANNOTATION: "8080,8081", BOOTSTRAP_PORT_ANNOTATION: "8998"}), WorkerPolicy()
        )
        assert [w.bootstrap_port for w in workers] == [8998, 8998]

    def test_a_list_aligned_with_the_ports(self) -> None:
        workers, _ = pod_workers(
            view({WORKER_PORTS_ANNOTATION: "8080,8081", BOOTSTRAP_PORT_ANNOTATION: "9080,9081"}), WorkerPolicy()
        )
        assert [(w.port, w.bootstrap_port) for w in workers] == [(8080, 9080), (8081, 9081)]

    def test_a_misaligned_list_skips_the_workers(self) -> None:
        """Three bootstrap ports for two workers: which goes where is unknown, so none is guessed."""
        workers, problems = pod_workers(
            view({WORKER_PORTS_ANNOTATION: "8080,8081", BOOTSTRAP_PORT_ANNOTATION: "1,2,3"}), WorkerPolicy()
        )
        assert workers == () and any("3 ports for 2 worker port(s)" in p for p in problems)

    def test_a_bad_entry_skips_its_worker(self) -> None:
        workers, problems = pod_workers(
            view({WORKER_PORTS_ANNOTATION: "8080,8081", BOOTSTRAP_PORT_ANNOTATION: "9080,x"}), WorkerPolicy()
        )
        assert [(w.port, w.bootstrap_port) for w in workers] == [(8080, 9080)]
        assert any("8081 skipped" in p for p in problems)


class TestModelId:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [("namespace", "inference"), ("label:model", "llama"), ("annotation:smg.ai/model", "m-7b"), ("label:x", "")],
    )
    def test_sources(self, text: str, expected: str) -> None:
        """As smg --model-id-from; a missing key gives no model id."""
        policy = WorkerPolicy(port=8000, model_id_from=ModelIdFrom.parse(text))
        (worker,), _ = pod_workers(view({"smg.ai/model": "m-7b"}), policy)
        assert worker.model_id == expected

    @pytest.mark.parametrize("text", ["label:", "annotation:", "pod", ""])
    def test_bad_spellings(self, text: str) -> None:
        with pytest.raises(ValueError, match="namespace|needs a key"):
            ModelIdFrom.parse(text)

    def test_round_trip(self) -> None:
        assert str(ModelIdFrom.parse("annotation:a/b")) == "annotation:a/b"


def test_kv_annotations_apply_to_every_worker() -> None:
    """SMG's default --kv-connector-annotation and --kv-engine-id-annotation, as the pod gives them."""
    annotations = {WORKER_PORTS_ANNOTATION: "8080,8081", KV_CONNECTOR_ANNOTATION: "Nixl", KV_ENGINE_ID_ANNOTATION: "e"}
    workers, _ = pod_workers(view(annotations), WorkerPolicy())
    assert [(w.kv_connector, w.kv_engine_id) for w in workers] == [("Nixl", "e"), ("Nixl", "e")]


@given(st.dictionaries(st.sampled_from([WORKER_PORTS_ANNOTATION, BOOTSTRAP_PORT_ANNOTATION, "x"]), st.text()))
def test_any_annotations_never_raise(annotations: dict[str, str]) -> None:
    """Untrusted input: whatever the pod says, the result is workers with valid ports, or problems."""
    workers, problems = pod_workers(view(annotations), WorkerPolicy(port=8000))
    assert all(1 <= w.port <= 65535 for w in workers)
    assert all(isinstance(p, str) for p in problems)
