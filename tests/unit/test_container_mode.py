"""Dynamo's container mode in the pure core and the settings: names, the per-container readiness parser,
the join of one pod's several instances, and the configuration's rules."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.app.config import ConfigError, load_settings
from sidecar.core.containers import MAIN_CONTAINER_ANNOTATION, main_container_of, metadata_name, pod_peer_key
from sidecar.core.instance_id import instance_id
from sidecar.core.join import PeerJoin
from sidecar.core.resources import parse_pod_containers, parse_worker_metadata
from sidecar.kube.settings import KubeSettings
from sidecar.kube.sources import POD_CONTAINERS, watch_targets

NS = "ns"


def pod(
    name: str = "w0",
    uid: str = "u0",
    ready: dict[str, bool] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    ready = {"main": True, "engine": True} if ready is None else ready
    return {
        "metadata": {"name": name, "namespace": NS, "uid": uid, "annotations": annotations or {}},
        "spec": {"nodeName": "n1", "containers": [{"name": c} for c in ready]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.9",
            "containerStatuses": [{"name": c, "ready": r} for c, r in ready.items()],
        },
    }


def cr(name: str, owner_pod: str = "w0", owner_uid: str = "u0", data: Any = None) -> Any:
    return parse_worker_metadata(
        {
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"cr-{name}",
                "ownerReferences": [{"kind": "Pod", "name": owner_pod, "uid": owner_uid}],
            },
            "spec": {"data": data if data is not None else {"endpoints": {}, "who": name}},
        }
    )


class TestNames:
    def test_the_main_container_keeps_the_pods_name_others_get_their_own(self) -> None:
        assert metadata_name("w0", "main") == "w0"
        assert metadata_name("w0", "engine") == "w0-engine"
        assert metadata_name("w0", "engine", main_container="engine") == "w0"
        assert metadata_name("w0", "main", main_container="engine") == "w0-main"

    def test_a_remote_pods_main_container_comes_from_its_annotation(self) -> None:
        assert main_container_of({}) == "main"
        assert main_container_of({MAIN_CONTAINER_ANNOTATION: " engine "}) == "engine"
        assert main_container_of({MAIN_CONTAINER_ANNOTATION: "  "}) == "main"

    def test_peer_keys(self) -> None:
        assert pod_peer_key("u0", "w0", "w0") == "u0"
        assert pod_peer_key("u0", "w0", "w0-engine") == "u0/engine"


class TestParse:
    def test_one_entry_per_container_ready_as_its_status_says(self) -> None:
        record = parse_pod_containers(pod(ready={"main": True, "engine": False}))
        entries = {e.container: e for e in record.endpoints}
        assert {c: (e.ready, e.metadata_name, e.peer_key) for c, e in entries.items()} == {
            "main": (True, "w0", "u0"),
            "engine": (False, "w0-engine", "u0/engine"),
        }
        assert entries["main"].addresses == ("10.0.0.9",) and not entries["engine"].live

    def test_the_annotation_names_the_main_container(self) -> None:
        record = parse_pod_containers(pod(annotations={MAIN_CONTAINER_ANNOTATION: "engine"}))
        assert {e.container: e.metadata_name for e in record.endpoints} == {"main": "w0-main", "engine": "w0"}

    @pytest.mark.parametrize(
        "broken",
        [
            {
                "metadata": {"name": "w0", "namespace": NS},
                "status": {"containerStatuses": [{"name": "main", "ready": True}]},
            },
            {"metadata": {"name": "w0", "uid": "u0"}, "status": {"containerStatuses": [{"ready": True}, "x", None]}},
            {"metadata": {"name": "w0", "uid": "u0"}, "status": {"containerStatuses": None}},
        ],
    )
    def test_odd_pods_give_no_entries_and_never_raise(self, broken: dict[str, Any]) -> None:
        assert parse_pod_containers(broken).endpoints == ()


class TestJoin:
    def join(self, *objects: Any) -> PeerJoin:
        join = PeerJoin()
        join.upsert("pods/ns/w0", parse_pod_containers(pod()))
        for record in objects:
            join.upsert(f"crs/{NS}/{record.name}", record)
        return join

    def test_each_registering_container_is_a_peer_of_its_own(self) -> None:
        join = self.join(cr("w0"), cr("w0-engine"))
        main, engine = join.peer("u0"), join.peer("u0/engine")
        assert main is not None and engine is not None
        assert (main.name, main.container, main.instance_id) == ("w0", "main", instance_id("w0"))
        assert (engine.name, engine.container, engine.instance_id) == ("w0-engine", "engine", instance_id("w0-engine"))
        assert engine.data["who"] == "w0-engine"

    def test_a_container_that_registered_nothing_is_no_peer(self) -> None:
        join = self.join(cr("w0"))
        assert join.peer("u0") is not None and join.peer("u0/engine") is None

    def test_a_container_turning_unready_removes_only_its_peer(self) -> None:
        join = self.join(cr("w0"), cr("w0-engine"))
        affected = join.upsert("pods/ns/w0", parse_pod_containers(pod(ready={"main": True, "engine": False})))
        assert "u0/engine" in affected
        assert join.peer("u0") is not None and join.peer("u0/engine") is None

    def test_a_containers_cr_owned_by_another_pod_never_joins(self) -> None:
        join = self.join(cr("w0"), cr("w0-engine", owner_pod="w0-engine", owner_uid="u-other"))
        assert join.peer("u0/engine") is None

    def test_metadata_changes_reach_the_containers_peers(self) -> None:
        join = self.join(cr("w0"), cr("w0-engine"))
        affected = join.upsert(f"crs/{NS}/w0-engine", cr("w0-engine", data={"endpoints": {}, "who": "new"}))
        assert "u0/engine" in affected
        peer = join.peer("u0/engine")
        assert peer is not None and peer.data["who"] == "new"
        assert join.delete("pods/ns/w0") >= {"u0", "u0/engine"}
        assert join.peer("u0") is None and join.peer("u0/engine") is None


BASE = {"POD_NAME": "w0", "POD_NAMESPACE": NS, "POD_UID": "u0", "DISCOVERY_PODINFO_DIR": "/nonexistent"}


def kube_settings(environ: dict[str, str]) -> KubeSettings:
    """The Kubernetes backend's own settings from ``environ``."""
    settings = load_settings(environ=environ).backend_settings
    assert isinstance(settings, KubeSettings)
    return settings


class TestSettings:
    def test_container_mode_names_the_cr_and_watches_pods_as_dynamo_does(self) -> None:
        settings = kube_settings({**BASE, "DYN_KUBE_DISCOVERY_MODE": "container", "CONTAINER_NAME": "engine"})
        assert (settings.container_mode, settings.container_name, settings.metadata_name) == (
            True,
            "engine",
            "w0-engine",
        )
        readiness = [t for t in watch_targets(settings) if t.source is POD_CONTAINERS]
        assert [t.label_selector for t in readiness] == ["nvidia.com/dynamo-discovery-enabled=true"]

    def test_the_main_container_is_the_pod(self) -> None:
        env = {
            **BASE,
            "DYN_KUBE_DISCOVERY_MODE": "container",
            "CONTAINER_NAME": "vllm",
            "DYN_MAIN_CONTAINER_NAME": "vllm",
        }
        assert kube_settings(env).metadata_name == "w0"

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ({"DYN_KUBE_DISCOVERY_MODE": "container"}, "CONTAINER_NAME (--container-name) is not set"),
            (
                {"DYN_KUBE_DISCOVERY_MODE": "container", "CONTAINER_NAME": "e", "DISCOVERY_SERVICE_NAME": "w"},
                "readiness comes from the Pods' containerStatuses",
            ),
            ({"DYN_KUBE_DISCOVERY_MODE": "pods", "DISCOVERY_SERVICE_NAME": "w"}, "expected one of pod, container"),
        ],
    )
    def test_bad_settings_are_named(self, extra: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError, match="invalid configuration") as info:
            load_settings(environ={**BASE, **extra})
        assert message in str(info.value)

    def test_pod_mode_is_unchanged(self) -> None:
        settings = kube_settings({**BASE, "DISCOVERY_SERVICE_NAME": "w", "CONTAINER_NAME": "ignored"})
        assert (settings.container_mode, settings.metadata_name) == (False, "w0")
