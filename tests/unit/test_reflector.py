"""The reflector's list-then-watch loop on a scripted API server (``tests.unit.fake_api``).

Each test scripts what the API server answers, runs the reflector in its own thread and waits, with a
deadline, for what it should have sent (``ScriptedApi``) and written (``RecordingStore``). The same
loop against a real control plane is covered in tests/integration.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog
import urllib3

from devcluster.waiting import wait_for
from sidecar.kube.api import ApiError
from sidecar.kube.reflector import Reflector, WatchObserver
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA, WatchTarget
from sidecar.peers.metrics import Metrics
from tests.unit.fake_api import Call, ScriptedApi, ScriptedStream
from tests.unit.fake_store import DEADLINE, RecordingStore

NS = "ns"
SLICES = WatchTarget(ENDPOINT_SLICES, NS)
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"
METADATA_PATH = "/apis/nvidia.com/v1alpha1/namespaces/ns/dynamoworkermetadatas"


# -- objects ---------------------------------------------------------------------------------------------
def endpoint_slice(name: str, rv: str, pods: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """An EndpointSlice with one endpoint per pod (pod name -> ready)."""
    return {
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv},
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.0.0.{i + 1}"],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": NS, "uid": f"uid-{pod}"},
            }
            for i, (pod, ready) in enumerate((pods or {f"{name}-pod": True}).items())
        ],
    }


def worker_cr(name: str, rv: str, data: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"cr-{name}",
            "resourceVersion": rv,
            "ownerReferences": [{"kind": "Pod", "name": name, "uid": f"uid-{name}"}],
        },
        "spec": {"data": data},
    }


def page(items: list[dict[str, Any]], rv: str = "", cont: str = "") -> dict[str, Any]:
    """One page of a list: the items, the list's resourceVersion and the continue token (if more follow)."""
    metadata: dict[str, Any] = {"resourceVersion": rv}
    if cont:
        metadata["continue"] = cont
    return {"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items}


def event(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": dict(obj)}


def bookmark(rv: str) -> dict[str, Any]:
    return event("BOOKMARK", {"kind": "EndpointSlice", "metadata": {"resourceVersion": rv}})


def error_event(code: int, reason: str, message: str) -> dict[str, Any]:
    return event("ERROR", {"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message})


def gone(message: str = "too old resource version: 1 (2)") -> ApiError:
    return ApiError(410, "Expired", message, {"code": 410, "reason": "Expired"})


def read_timeout() -> urllib3.exceptions.ReadTimeoutError:
    return urllib3.exceptions.ReadTimeoutError(None, "/watch", "Read timed out.")  # type: ignore[arg-type]


def key(obj: Mapping[str, Any]) -> str:
    return f"{NS}/{obj['metadata']['name']}"


# -- the rig ---------------------------------------------------------------------------------------------
class Rig:
    """A reflector over a scripted API and a recording store; started by the test, stopped by the fixture."""

    def __init__(self) -> None:
        self.api = ScriptedApi()
        self.store = RecordingStore()
        self.metrics = Metrics()
        self.reflector: Reflector | None = None
        self.thread: threading.Thread | None = None

    def start(
        self,
        target: WatchTarget = SLICES,
        observers: list[WatchObserver] | None = None,
        page_size: int = 500,
        backoff_max: float = 0.05,
        streaming_list: bool = False,
    ) -> Reflector:
        self.reflector = Reflector(
            self.api.as_kube_api(),
            target,
            self.store,
            self.metrics,
            silence_timeout=0.5,
            backoff_max=backoff_max,
            page_size=page_size,
            observers=observers,
            streaming_list=streaming_list,
        )
        self.thread = self.reflector.start()
        return self.reflector

    def watches(self, count: int) -> list[Call]:
        """Wait until the watch was opened ``count`` times; return those requests."""
        return self.api.wait_for_calls("stream", count)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def restarts(self, reason: str, source: str = "endpointslices") -> float:
        return self.sample("discovery_watch_restarts_total", source=source, reason=reason)

    def stop(self) -> None:
        if self.reflector is not None:
            self.reflector.stop(timeout=DEADLINE)
        self.api.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.stop()
    assert r.thread is None or not r.thread.is_alive(), "the reflector thread must end on stop()"
    assert not r.api.exhausted, f"unscripted API calls: {r.api.exhausted}"


def store_ops_except_health(store: RecordingStore) -> list[str]:
    return [op for op in store.ops() if op != "set_health"]


# -- list ------------------------------------------------------------------------------------------------
class TestPaginatedList:
    def test_pages_are_replaced_as_one_set_and_the_watch_starts_from_the_list_resource_version(self, rig: Rig) -> None:
        """Two pages joined by a continue token reach the store as one replace; the watch resumes at the list's RV."""
        s1, s2 = endpoint_slice("s1", "11"), endpoint_slice("s2", "12")
        rig.api.on_get(page([s1], rv="", cont="token-1"), page([s2], rv="100"))
        rig.api.on_stream(ScriptedStream())
        rig.start(page_size=1)
        (watch,) = rig.watches(1)

        first, second = rig.api.calls_of("get")
        assert first.path == second.path == SLICES_PATH
        assert first.query == (("limit", "1"),)
        assert second.query == (("limit", "1"), ("continue", "token-1"))
        (replace,) = rig.store.of("replace")
        assert replace.records == {key(s1): ENDPOINT_SLICES.parse(s1), key(s2): ENDPOINT_SLICES.parse(s2)}
        assert rig.store.ops() == ["replace"]
        assert watch.path == SLICES_PATH
        assert watch.params["resourceVersion"] == "100"
        assert watch.params["watch"] == "1"
        assert watch.params["allowWatchBookmarks"] == "true"
        assert 300 <= int(watch.params["timeoutSeconds"]) <= 600
        assert watch.read_timeout == 0.5, "the watch's read timeout is the silence timeout"


def initial_events_end(rv: str) -> dict[str, Any]:
    return event(
        "BOOKMARK",
        {
            "kind": "EndpointSlice",
            "metadata": {"resourceVersion": rv, "annotations": {"k8s.io/initial-events-end": "true"}},
        },
    )


class TestStreamingList:
    def test_initial_events_are_one_replace_and_the_same_stream_goes_on_as_the_watch(self, rig: Rig) -> None:
        """ADDED events up to the initial-events-end bookmark reach the store as one replace, nothing before it;
        later events on the same stream are ordinary watch events; the next watch resumes at the last RV."""
        s1, s2 = endpoint_slice("s1", "11"), endpoint_slice("s2", "12")
        s1_later = endpoint_slice("s1", "21", {"p": False})
        rig.api.on_stream(
            ScriptedStream(
                event("ADDED", s1),
                event("ADDED", s2),
                initial_events_end("20"),
                event("MODIFIED", s1_later),
                then="end",
            ),
            ScriptedStream(),
        )
        rig.start(WatchTarget(ENDPOINT_SLICES, NS, "app=w"), streaming_list=True)
        first, second = rig.watches(2)

        assert first.params["sendInitialEvents"] == "true"
        assert first.params["resourceVersionMatch"] == "NotOlderThan"
        assert first.params["resourceVersion"] == ""
        assert first.params["labelSelector"] == "app=w" and first.params["allowWatchBookmarks"] == "true"
        assert rig.api.calls_of("get") == [], "no LIST"
        assert store_ops_except_health(rig.store)[:2] == ["replace", "upsert"]
        (replace,) = rig.store.of("replace")
        assert replace.records == {key(s1): ENDPOINT_SLICES.parse(s1), key(s2): ENDPOINT_SLICES.parse(s2)}
        assert "sendInitialEvents" not in second.params
        assert second.params["resourceVersion"] == "21"

    def test_a_break_after_the_initial_set_resumes_from_the_last_resource_version(self, rig: Rig) -> None:
        """Once the initial set is applied the stream is an ordinary watch: losing it is no reason to list again."""
        rig.api.on_stream(
            ScriptedStream(
                event("ADDED", endpoint_slice("s1", "11")),
                initial_events_end("20"),
                urllib3.exceptions.ProtocolError("reset"),
            ),
            ScriptedStream(),
        )
        rig.start(streaming_list=True)
        _, second = rig.watches(2)
        assert "sendInitialEvents" not in second.params and second.params["resourceVersion"] == "20"
        assert len(rig.store.of("replace")) == 1

    def test_a_server_that_refuses_it_gets_the_paginated_list_from_then_on(self, rig: Rig) -> None:
        refused = ApiError(
            422, "Invalid", "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"
        )
        rig.api.on_stream(refused, ScriptedStream())
        rig.api.on_get(page([endpoint_slice("s1", "3")], rv="7"))
        reflector = rig.start(streaming_list=True)
        _, watch = rig.watches(2)
        assert watch.params["resourceVersion"] == "7" and "sendInitialEvents" not in watch.params
        assert len(rig.api.calls_of("get")) == 1
        assert reflector.streaming_list is False

    def test_a_stream_that_ends_before_the_initial_set_is_complete_starts_over(self, rig: Rig) -> None:
        """Nothing partial reaches the store: the next attempt streams the whole set again."""
        s1 = endpoint_slice("s1", "11")
        rig.api.on_stream(
            ScriptedStream(event("ADDED", s1), then="end"),
            ScriptedStream(event("ADDED", s1), initial_events_end("15")),
        )
        rig.start(streaming_list=True)
        first, second = rig.watches(2)
        assert first.params["sendInitialEvents"] == second.params["sendInitialEvents"] == "true"
        wait_for(lambda: rig.store.of("replace"), DEADLINE, what="the replace of the second attempt")
        assert store_ops_except_health(rig.store) == ["replace"]


class TestLabelSelector:
    def test_selector_is_sent_on_the_list_and_on_the_watch(self, rig: Rig) -> None:
        """The target's label selector restricts both the list pages and the watch."""
        rig.api.on_get(page([], cont="c"), page([], rv="5"))
        rig.start(WatchTarget(ENDPOINT_SLICES, NS, "app=w,tier!=cache"), page_size=1)
        (watch,) = rig.watches(1)
        for call in [*rig.api.calls_of("get"), watch]:
            assert call.params["labelSelector"] == "app=w,tier!=cache"

    def test_no_selector_sends_no_label_selector(self, rig: Rig) -> None:
        """Without a selector the list and watch carry no labelSelector parameter at all."""
        rig.api.on_get(page([], rv="5"))
        rig.start(SLICES)
        (watch,) = rig.watches(1)
        (listed,) = rig.api.calls_of("get")
        assert "labelSelector" not in listed.params
        assert "labelSelector" not in watch.params


    def test_the_own_registration_watch_asks_for_one_object_by_name(self, rig: Rig) -> None:
        """This pod's own CR alone: a field selector on its name, on the streaming list and on every watch, under
        its own label in metrics and logs (it feeds the registrar, not the directory)."""
        from sidecar.kube.sources import own_registration_target

        target = own_registration_target(NS, "worker-0")
        assert target.name == "registration" and target.collection == WORKER_METADATA.resource.collection(NS)
        rig.start(target, streaming_list=True)
        (watch,) = rig.watches(1)
        assert watch.params["fieldSelector"] == "metadata.name=worker-0"
        assert watch.params["sendInitialEvents"] == "true" and "labelSelector" not in watch.params


# -- watch events ----------------------------------------------------------------------------------------
class TestEvents:
    def test_added_modified_deleted_become_upsert_and_delete(self, rig: Rig) -> None:
        """Each event reaches the store keyed namespace/name with the source's parsed record, in order."""
        added = endpoint_slice("s1", "101", {"a": True})
        modified = endpoint_slice("s1", "102", {"a": True, "b": False})
        deleted = endpoint_slice("s1", "103", {"a": True, "b": False})
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", added), event("MODIFIED", modified), event("DELETED", deleted), then="end"),
            ScriptedStream(),
        )
        rig.start()
        second = rig.watches(2)[1]

        calls = rig.store.snapshot()
        assert [c.op for c in calls] == ["replace", "upsert", "upsert", "delete"]
        assert (calls[1].key, calls[1].record) == ("ns/s1", ENDPOINT_SLICES.parse(added))
        assert (calls[2].key, calls[2].record) == ("ns/s1", ENDPOINT_SLICES.parse(modified))
        assert calls[3].key == "ns/s1"
        assert second.params["resourceVersion"] == "103", "the next watch resumes after the last event"
        assert len(rig.api.calls_of("get")) == 1, "a watch the server ended is resumed, not relisted"

    def test_unknown_event_type_is_ignored(self, rig: Rig) -> None:
        """An event type the reflector does not know changes nothing: no store call, no RV move, a warning."""
        known = endpoint_slice("s1", "101")
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", known), event("WEIRD", endpoint_slice("s2", "999")), then="end"),
            ScriptedStream(),
        )
        with structlog.testing.capture_logs() as logs:
            rig.start()
            second = rig.watches(2)[1]

        assert rig.store.ops() == ["replace", "upsert"]
        assert second.params["resourceVersion"] == "101"
        assert any(e["event"] == "unknown watch event type ignored" and e["type"] == "WEIRD" for e in logs)
        assert rig.sample("discovery_watch_events_total", source="endpointslices", type="weird") == 0


class TestBookmark:
    def test_bookmark_moves_the_resource_version_without_touching_the_store(self, rig: Rig) -> None:
        """A BOOKMARK only advances the RV the next watch resumes from."""
        rig.api.on_get(page([endpoint_slice("s1", "90")], rv="100"))
        rig.api.on_stream(ScriptedStream(bookmark("150"), then="end"), ScriptedStream())
        rig.start()
        second = rig.watches(2)[1]

        assert second.params["resourceVersion"] == "150"
        assert rig.store.ops() == ["replace"]
        assert len(rig.api.calls_of("get")) == 1


class TestObservers:
    def test_observers_are_called_after_the_store_with_type_and_object(self, rig: Rig) -> None:
        """Observers see (type, object) of ADDED/MODIFIED/DELETED once the store applied the event, never BOOKMARK."""
        obj = endpoint_slice("s1", "101")

        def observer(kind: str, seen: Mapping[str, Any]) -> None:
            rig.store.note("observed", key=kind, detail=dict(seen))

        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(ScriptedStream(event("ADDED", obj), bookmark("120"), event("DELETED", obj)))
        rig.start(observers=[observer])
        calls = rig.store.wait_for(lambda cs: sum(c.op == "observed" for c in cs) == 2, "two observations")

        assert [c.op for c in calls] == ["replace", "upsert", "observed", "delete", "observed"]
        assert (calls[2].key, calls[2].detail) == ("ADDED", obj)
        assert (calls[4].key, calls[4].detail) == ("DELETED", obj)


class TestInvalidMetadata:
    def test_invalid_object_is_still_upserted_with_its_problem_and_a_warning(self, rig: Rig) -> None:
        """A CR whose spec.data is unusable is stored with ``problem`` set (so the join keeps the last good data)."""
        bad = worker_cr("w-0", "101", ["not", "an", "object"])
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(ScriptedStream(event("ADDED", bad)))
        with structlog.testing.capture_logs() as logs:
            rig.start(WatchTarget(WORKER_METADATA, NS))
            (upsert,) = rig.store.wait_for_ops("upsert", 1)

        assert upsert.key == "ns/w-0"
        assert upsert.record is not None and upsert.record.problem
        assert upsert.record == WORKER_METADATA.parse(bad)
        (warning,) = [e for e in logs if e["event"].startswith("invalid worker metadata")]
        assert warning["log_level"] == "warning"
        assert warning["object"] == "ns/w-0"
        assert warning["reason"] == upsert.record.problem
        assert rig.api.calls_of("get")[0].path == METADATA_PATH


class TestNoThreadDies:
    def test_a_parser_that_raises_skips_that_object_only(self, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
        """Whatever one object holds, the watch goes on: a failing parse is logged and that object skipped."""
        real_parse = ENDPOINT_SLICES.parse

        def parse(obj: Mapping[str, Any]) -> Any:
            if obj["metadata"]["name"] == "boom":
                raise RecursionError("maximum recursion depth exceeded")
            return real_parse(obj)

        source = type(ENDPOINT_SLICES)(ENDPOINT_SLICES.name, ENDPOINT_SLICES.noun, ENDPOINT_SLICES.resource, parse)
        rig.api.on_get(page([endpoint_slice("boom", "1"), endpoint_slice("a", "2")], rv="100"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", endpoint_slice("boom", "101")), event("ADDED", endpoint_slice("b", "102")))
        )
        with structlog.testing.capture_logs() as logs:
            rig.start(WatchTarget(source, NS))
            (upsert,) = rig.store.wait_for_ops("upsert", 1)

        (replace,) = [c for c in rig.store.snapshot() if c.op == "replace"]
        assert replace.records is not None and set(replace.records) == {"ns/a"}
        assert upsert.key == "ns/b"
        assert [e["object"] for e in logs if e["event"].startswith("cannot parse this EndpointSlice")] == [
            "ns/boom",
            "ns/boom",
        ]
        assert rig.thread is not None and rig.thread.is_alive()

    def test_an_observer_that_raises_does_not_end_the_watch(self, rig: Rig) -> None:
        """An observer's bug is logged; the events after it are still applied."""

        def observer(kind: str, obj: Mapping[str, Any]) -> None:
            raise ValueError("observer bug")

        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", endpoint_slice("a", "101")), event("ADDED", endpoint_slice("b", "102")))
        )
        with structlog.testing.capture_logs() as logs:
            rig.start(observers=[observer])
            rig.store.wait_for_ops("upsert", 2)
        assert len([e for e in logs if e["event"] == "watch observer failed"]) == 2
        assert rig.thread is not None and rig.thread.is_alive()


# -- 410 Gone --------------------------------------------------------------------------------------------
class TestGone:
    def test_410_on_the_watch_request_relists(self, rig: Rig) -> None:
        """A 410 answering the watch request means the RV is compacted: list again, then watch from the new RV."""
        a, b = endpoint_slice("a", "90"), endpoint_slice("b", "190")
        rig.api.on_get(page([a], rv="100"), page([a, b], rv="200"))
        rig.api.on_stream(gone(), ScriptedStream())
        rig.start()
        second = rig.watches(2)[1]

        first_replace, second_replace = rig.store.of("replace")
        assert set(first_replace.records) == {"ns/a"}
        assert set(second_replace.records) == {"ns/a", "ns/b"}, "the relist hands the store the full set"
        assert second.params["resourceVersion"] == "200"
        assert "set_health" not in rig.store.ops(), "an expired RV is routine, not an outage"
        assert rig.restarts("expired") == 1

    def test_error_event_410_relists_and_hands_the_store_the_full_set(self, rig: Rig) -> None:
        """An ERROR event with code 410 relists; the store gets the whole new set (diffing is its job)."""
        a, b = endpoint_slice("a", "90"), endpoint_slice("b", "101")
        rig.api.on_get(page([a], rv="100"), page([a, b], rv="300"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", b), error_event(410, "Expired", "too old resource version")),
            ScriptedStream(),
        )
        rig.start()
        second = rig.watches(2)[1]

        assert store_ops_except_health(rig.store) == ["replace", "upsert", "replace"]
        assert rig.store.of("replace")[1].records == {
            "ns/a": ENDPOINT_SLICES.parse(a),
            "ns/b": ENDPOINT_SLICES.parse(b),
        }
        assert second.params["resourceVersion"] == "300"
        assert len(rig.api.calls_of("get")) == 2
        assert "set_health" not in rig.store.ops()
        assert rig.restarts("expired") == 1
        assert rig.api.streams[0].closed, "the abandoned watch is closed"

    def test_410_in_the_middle_of_a_paginated_list_starts_the_list_over(self, rig: Rig) -> None:
        """An expired continue token restarts from the first page; the store sees one replace of the fresh set."""
        stale, fresh, last = endpoint_slice("stale", "1"), endpoint_slice("fresh", "2"), endpoint_slice("last", "3")
        rig.api.on_get(
            page([stale], cont="c1"),
            gone("The provided continue parameter is too old"),
            page([fresh], cont="c2"),
            page([last], rv="400"),
        )
        rig.start(page_size=1)
        (watch,) = rig.watches(1)

        queries = [c.params.get("continue") for c in rig.api.calls_of("get")]
        assert queries == [None, "c1", None, "c2"]
        (replace,) = rig.store.of("replace")
        assert set(replace.records) == {"ns/fresh", "ns/last"}
        assert rig.store.ops() == ["replace"]
        assert watch.params["resourceVersion"] == "400"


# -- failures --------------------------------------------------------------------------------------------
class TestWatchErrorEvent:
    def test_error_event_with_another_code_reports_unhealthy_then_healthy(self, rig: Rig) -> None:
        """An ERROR event that is not 410 is a failure: unhealthy with the reason, backoff, re-watch, healthy."""
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(ScriptedStream(error_event(500, "InternalError", "etcd hiccup")), ScriptedStream())
        rig.start()
        second = rig.watches(2)[1]
        rig.store.wait_for_ops("set_health", 2)

        health = [(c.healthy, c.reason) for c in rig.store.of("set_health")]
        assert health == [(False, "API error 500 InternalError: etcd hiccup"), (True, "")]
        assert second.params["resourceVersion"] == "100", "a failed watch resumes; it does not relist"
        assert len(rig.api.calls_of("get")) == 1
        assert rig.restarts("error") == 1
        assert rig.sample("discovery_api_errors_total", operation="watch-endpointslices", code="500") == 1


class TestConnectionErrors:
    @pytest.mark.parametrize(
        "error",
        [urllib3.exceptions.ProtocolError("Connection aborted."), ConnectionRefusedError(111, "Connection refused")],
        ids=["protocol-error", "connection-refused"],
    )
    def test_connection_error_on_list_is_unhealthy_retried_and_recovers(self, rig: Rig, error: Exception) -> None:
        """Unreachable API server: unhealthy once with a reason, retried with backoff, and healthy only once the
        list is applied (so CONNECTED on the stream means the peer set is current, not about to change)."""
        rig.api.on_get(error, error, page([endpoint_slice("s1", "1")], rv="100"))
        rig.start()
        rig.watches(1)

        calls = rig.store.snapshot()
        assert [(c.op, c.healthy) for c in calls] == [("set_health", False), ("replace", None), ("set_health", True)]
        assert calls[0].reason == f"cannot reach the API server: {type(error).__name__}"
        assert len(rig.api.calls_of("get")) == 3
        assert rig.sample("discovery_api_errors_total", operation="watch-endpointslices", code="connection") == 2
        assert rig.restarts("error") == 2

    def test_an_outage_logs_one_warning_when_it_starts_and_one_info_when_it_ends(self, rig: Rig) -> None:
        """Three failed attempts are one outage: a warning, then debug lines (counted in metrics), then an info
        line with how long it lasted and how many attempts failed."""
        refused = ConnectionRefusedError(111, "Connection refused")
        rig.api.on_get(refused, refused, refused, page([], rv="100"))
        with structlog.testing.capture_logs() as logs:
            rig.start()
            rig.watches(1)
            rig.store.wait_for_ops("set_health", 2)

        failures = [e for e in logs if e["event"] == "watch failed, retrying"]
        assert [e["log_level"] for e in failures] == ["warning", "debug", "debug"]
        (back,) = [e for e in logs if e["event"] == "API server reachable again"]
        assert back["log_level"] == "info" and back["failed_attempts"] == 3 and back["outage_seconds"] >= 0
        assert not [e for e in logs if e["log_level"] == "error"], "a transient outage needs no human"
        assert rig.sample("discovery_api_errors_total", operation="watch-endpointslices", code="connection") == 3

    def test_connection_error_mid_watch_resumes_from_the_last_resource_version(self, rig: Rig) -> None:
        """A watch reset after some events resumes from the last event's RV, without relisting."""
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(
            ScriptedStream(event("ADDED", endpoint_slice("s1", "101")), urllib3.exceptions.ProtocolError("reset")),
            ScriptedStream(),
        )
        rig.start()
        second = rig.watches(2)[1]
        rig.store.wait_for_ops("set_health", 2)

        assert second.params["resourceVersion"] == "101"
        assert store_ops_except_health(rig.store) == ["replace", "upsert"]
        assert [c.healthy for c in rig.store.of("set_health")] == [False, True]


class TestSilentWatch:
    def test_silent_watch_restarts_from_the_last_resource_version_without_relist_or_unhealthy(self, rig: Rig) -> None:
        """A read timeout on the watch abandons it and re-watches from the last RV: no relist, no DEGRADED."""
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(ScriptedStream(event("ADDED", endpoint_slice("s1", "101")), read_timeout()), ScriptedStream())
        with structlog.testing.capture_logs() as logs:
            rig.start()
            second = rig.watches(2)[1]

        assert second.params["resourceVersion"] == "101"
        assert len(rig.api.calls_of("get")) == 1
        assert rig.store.ops() == ["replace", "upsert"]
        assert rig.restarts("silent") == 1
        assert rig.restarts("error") == 0
        assert rig.api.streams[0].closed
        assert any(e["event"] == "watch silent, restarting it" for e in logs)

    def test_read_timeout_on_the_list_is_a_failure_not_a_silent_watch(self, rig: Rig) -> None:
        """A list whose response stalls past the request timeout is an API failure: unhealthy, backoff, retry.

        (``KubeApi.get`` raises ``ReadTimeoutError`` when the body of a list stops arriving.)
        """
        rig.api.on_get(read_timeout(), page([], rv="100"))
        rig.start()
        rig.watches(1)

        assert [c.healthy for c in rig.store.of("set_health")] == [False, True]
        assert rig.store.of("set_health")[0].reason
        assert rig.restarts("silent") == 0, "no watch was open, so none went silent"


class TestHints:
    @pytest.mark.parametrize(
        ("status", "hint"),
        [(403, "manifests/rbac.yaml"), (404, "manifests/components/crd/crd.yaml")],
        ids=["forbidden-rbac", "not-found-crd"],
    )
    def test_failure_log_carries_the_operator_hint(self, rig: Rig, status: int, hint: str) -> None:
        """403 on the list points at the RBAC manifest, 404 at the CRD; the reason names the status. Both need a
        human: logged at error level."""
        rig.api.on_get(ApiError(status, "Forbidden" if status == 403 else "NotFound", "nope"), page([], rv="1"))
        with structlog.testing.capture_logs() as logs:
            rig.start()
            rig.watches(1)

        (failure,) = [e for e in logs if e["event"] == "watch failed, retrying"]
        assert failure["log_level"] == "error"
        assert hint in failure["hint"]
        assert failure["reason"].startswith(f"API error {status} ")
        assert failure["source"] == "endpointslices"
        health = rig.store.of("set_health")
        assert [c.healthy for c in health] == [False, True]
        assert health[0].reason == failure["reason"]


class TestMetrics:
    def test_counters_follow_lists_and_events(self, rig: Rig) -> None:
        """Relists and applied events are counted per source and event type."""
        s = endpoint_slice("s1", "101")
        rig.api.on_get(page([], rv="100"), page([s], rv="200"))
        rig.api.on_stream(
            ScriptedStream(
                event("ADDED", s),
                event("MODIFIED", s),
                event("MODIFIED", s),
                event("DELETED", s),
                error_event(410, "Expired", ""),
            ),
            ScriptedStream(),
        )
        rig.start()
        rig.watches(2)

        def events(kind: str) -> float:
            return rig.sample("discovery_watch_events_total", source="endpointslices", type=kind)

        assert (events("added"), events("modified"), events("deleted")) == (1, 2, 1)
        assert rig.sample("discovery_relists_total", source="endpointslices") == 2
        assert rig.restarts("expired") == 1
        assert rig.reflector is not None and rig.reflector.relists == 2


class TestStop:
    def test_stop_ends_the_thread_promptly_while_blocked_in_a_watch(self, rig: Rig) -> None:
        """stop() closes the open watch, so a reflector waiting for events ends at once."""
        rig.api.on_get(page([], rv="100"))
        rig.api.on_stream(ScriptedStream())
        reflector = rig.start()
        rig.watches(1)
        thread = rig.thread
        assert thread is not None and thread.is_alive()

        reflector.stop(timeout=DEADLINE)

        assert not thread.is_alive()
        assert rig.api.streams[0].closed
        assert len(rig.api.calls_of("stream")) == 1, "no watch is reopened after stop()"
