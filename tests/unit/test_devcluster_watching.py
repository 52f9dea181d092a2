"""devcluster.watching: the harness's list-and-watch loop tells its handler every object's end."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from devcluster.watching import CollectionWatch
from sidecar.kube.api import ApiError
from tests.unit.fake_api import DEADLINE, ScriptedApi, ScriptedStream
from tests.unit.test_reflector import page


def pod(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


def test_a_relist_reports_what_went_while_the_watch_was_down() -> None:
    """The server closes the watch, resuming it is refused (410), and the relist no longer has pod b:
    the handler hears that b was DELETED, as an informer's Replace would say."""
    api = ScriptedApi()
    api.on_get(page([pod("a", "1"), pod("b", "2")], rv="2"), page([pod("a", "1"), pod("c", "5")], rv="5"))
    api.on_stream(ScriptedStream(then="end"), ApiError(410, "Gone", "too old resource version"))
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def handler(kind: str, obj: Mapping[str, Any]) -> None:
        seen.append((kind, obj["metadata"]["name"]))
        if (kind, obj["metadata"]["name"]) == ("ADDED", "c"):
            done.set()

    watch = CollectionWatch(api.as_kube_api(), "/api/v1/namespaces/ns/pods", handler).start()
    try:
        assert done.wait(DEADLINE), seen
    finally:
        watch.stop()
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "b"), ("ADDED", "a"), ("ADDED", "c")]
