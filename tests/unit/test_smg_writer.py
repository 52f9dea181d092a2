"""Tests for sidecar.serve.smg_writer: the manifest file follows the hub, atomically, only once synced."""

from __future__ import annotations

import json
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from devcluster.waiting import wait_for
from sidecar.core.directory import PeerDirectory
from sidecar.core.join import PeerJoin
from sidecar.core.resources import parse_pod
from sidecar.core.selectors import parse_selector
from sidecar.core.smg_manifest import SmgManifestSettings, SmgRoles
from sidecar.core.workers import WorkerPolicy
from sidecar.peers.hub import PeerHub
from sidecar.serve.smg_writer import SmgManifestWriter, write_atomically


def pod(name: str, ip: str, role: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": {"app": "sglang", "role": role},
            "annotations": annotations or {},
        },
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


class World:
    def __init__(self, path: pathlib.Path) -> None:
        join = PeerJoin(require_metadata=False, workers=WorkerPolicy(port=8000))
        self.hub = PeerHub(PeerDirectory(uuid.uuid4().hex, 1000, ["pods"], join), "self")
        self.store = self.hub.store("pods")
        roles = SmgRoles(prefill=parse_selector("role=prefill"), decode=parse_selector("role=decode"))
        self.path = path
        self.writer = SmgManifestWriter(self.hub, SmgManifestSettings(path, roles), structlog.get_logger())

    def put(self, *pods: dict[str, Any]) -> None:
        for p in pods:
            self.store.upsert(f"ns/{p['metadata']['name']}", parse_pod(p))

    def urls(self) -> list[tuple[str, str]]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [(w["url"], w["worker_type"]) for w in doc["workers"]]


@pytest.fixture
def world(tmp_path: pathlib.Path) -> Iterator[World]:
    w = World(tmp_path / "workers.json")
    yield w
    w.writer.stop()
    w.hub.close()


def test_nothing_is_written_before_sync_then_the_set(world: World) -> None:
    """Before the first list an empty file would deregister SMG's workers: nothing is written until then."""
    world.writer.start()
    world.put(pod("p-0", "10.0.0.1", "prefill", {"sglang.ai/bootstrap-port": "8998"}))
    assert not world.path.exists()
    world.store.replace({"ns/d-0": parse_pod(pod("d-0", "10.0.0.2", "decode"))})  # the first list: synced
    wait_for(lambda: world.urls() == [("http://10.0.0.2:8000", "decode")], 5, what="the listed set")
    doc = json.loads(world.path.read_text())
    assert doc["version"] == 1


def test_follows_changes_and_rewrites_only_on_change(world: World) -> None:
    world.store.replace({})
    world.writer.start()
    wait_for(lambda: world.path.exists(), 5, what="the empty manifest once synced")
    assert world.urls() == []
    world.put(pod("p-0", "10.0.0.1", "prefill", {"sglang.ai/bootstrap-port": "8998"}))
    wait_for(lambda: world.urls() == [("http://10.0.0.1:8000", "prefill")], 5, what="the prefill worker")
    assert json.loads(world.path.read_text())["workers"][0]["bootstrap_port"] == 8998
    writes = world.writer.writes
    other = pod("x-0", "10.0.0.9", "other")  # not selected: the peer set changes, the manifest does not
    world.put(other)
    world.put(pod("d-0", "10.0.0.2", "decode"))
    wait_for(lambda: len(world.urls()) == 2, 5, what="the decode worker")
    assert world.writer.writes == writes + 1
    registry = world.writer.metrics.registry
    assert registry.get_sample_value("discovery_smg_manifest_workers") == 2
    assert registry.get_sample_value("discovery_smg_manifest_writes_total", {"result": "ok"}) == world.writer.writes
    assert [p.name for p in world.path.parent.iterdir()] == ["workers.json"]  # no temporary file left


def test_the_last_good_file_stays_while_the_api_server_is_lost(world: World) -> None:
    world.store.replace({"ns/d-0": parse_pod(pod("d-0", "10.0.0.2", "decode"))})
    world.writer.start()
    wait_for(lambda: len(world.urls()) == 1, 5, what="the first manifest")
    world.store.set_health(False, "connection refused")
    world.store.delete("ns/d-0")  # e.g. a relist racing the outage: not shown to SMG while degraded
    revision = world.hub.state().revision
    wait_for(lambda: world.writer.seen_revision >= revision, 5, what="the writer to see the removal")
    assert world.urls() == [("http://10.0.0.2:8000", "decode")]
    world.store.set_health(True)
    wait_for(lambda: world.urls() == [], 5, what="the current set once connected again")


def test_not_ready_until_the_first_manifest_then_ready(world: World) -> None:
    """A gateway must not take traffic before its SMG has workers: not ready until the first write."""
    assert world.writer.problems() == ["SMG manifest: not written yet (waiting for the first sync of the peers)"]
    world.writer.start()
    world.store.replace({"ns/d-0": parse_pod(pod("d-0", "10.0.0.2", "decode"))})
    wait_for(lambda: len(world.urls()) == 1, 5, what="the first manifest")
    assert world.writer.problems() == []


def test_a_degraded_registration_alone_does_not_hold_the_file(world: World) -> None:
    """DEGRADED because this pod's own registration cannot be written says nothing about the peers: the
    manifest follows them."""
    world.store.replace({"ns/d-0": parse_pod(pod("d-0", "10.0.0.2", "decode"))})
    world.hub.set_registration_health(False, "waiting for DynamoWorkerMetadata ns/gw to finish deleting")
    world.writer.start()
    wait_for(lambda: len(world.urls()) == 1, 5, what="the first manifest, although DEGRADED")
    world.store.delete("ns/d-0")
    wait_for(lambda: world.urls() == [], 5, what="the removal written")


def test_a_failed_write_is_a_readiness_problem_and_retried(world: World, tmp_path: pathlib.Path) -> None:
    """A volume that refuses the write (here: the manifest path is a directory) keeps readiness failing."""
    world.path.mkdir()
    world.store.replace({"ns/d-0": parse_pod(pod("d-0", "10.0.0.2", "decode"))})
    world.writer.start()
    wait_for(lambda: "cannot write" in "".join(world.writer.problems()), 5, what="the problem reported")
    world.path.rmdir()
    wait_for(lambda: world.urls() and not world.writer.problems(), 10, what="the retry")


def test_write_atomically_replaces_in_place(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")
    write_atomically(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["m.json"]
