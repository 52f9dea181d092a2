"""The daemon on the etcd backend, without an etcd: what ``sidecar.etcd.backend.build`` wires to what, and
what GetSelf reports.

The behaviour on a real etcd (registration, peers, faults) is in tests/integration/test_etcd_sidecar.py;
these check the wiring that makes it so, and the two small port changes it needed.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from sidecar.app.config import load_settings
from sidecar.app.daemon import Sidecar
from sidecar.core.directory import PeerDirectory
from sidecar.core.instance_id import instance_id
from sidecar.core.instance_join import InstanceJoin
from sidecar.etcd.client import EtcdClient
from sidecar.etcd.own_keys import OwnKeysWatch
from sidecar.etcd.publisher import EtcdPublisher
from sidecar.etcd.source import EtcdSource
from sidecar.kube.publisher import KubePublisher
from sidecar.peers.hub import PeerHub
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import NotRegistering, PodIdentity, Registration
from sidecar.serve.grpc_service import DiscoveryService
from tests.unit.fake_api import ScriptedApi


def etcd_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    return {
        "POD_NAME": "worker-0",
        "POD_NAMESPACE": "demo",
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": "http://127.0.0.1:1",
        "DISCOVERY_GRPC_LISTEN": "127.0.0.1:0",
        "DISCOVERY_HTTP_LISTEN": "off",
        "DISCOVERY_PODINFO_DIR": str(tmp_path),
        **extra,
    }


@pytest.fixture
def etcd_sidecar(tmp_path: pathlib.Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(load_settings(environ=etcd_env(tmp_path)))  # constructing dials nothing
    yield sidecar
    sidecar.grpc.stop(grace=0.1)
    sidecar.backend.close()


class TestEtcdWiring:
    def test_one_etcd_source_and_the_lease_as_publisher(self, etcd_sidecar: Sidecar) -> None:
        """No Kubernetes part: the etcd watch feeds the hub, the lease registers, no API client exists."""
        backend = etcd_sidecar.backend
        assert backend.name == "etcd" and isinstance(backend.sources[0], EtcdSource)
        assert isinstance(backend.sources[0].client, EtcdClient)
        assert [type(w) for w in backend.sources] == [EtcdSource]
        assert isinstance(etcd_sidecar.publisher, EtcdPublisher)
        assert etcd_sidecar.publisher.lease_ttl == 30
        assert etcd_sidecar.hub.store("etcd").source == "etcd"
        with pytest.raises(ValueError, match="unknown source"):
            etcd_sidecar.hub.store("endpointslices")

    def test_self_follows_the_lease(self, etcd_sidecar: Sidecar) -> None:
        """A new lease is a new instance: the hub's "self" (left out of streams) moves with it."""
        publisher = etcd_sidecar.publisher
        assert isinstance(publisher, EtcdPublisher) and publisher.on_registered is not None
        assert etcd_sidecar.hub.self_uid == ""
        publisher.on_registered(0x2A)
        assert etcd_sidecar.hub.self_uid == "etcd/2a"
        publisher.on_registered(0x2B)
        assert etcd_sidecar.hub.self_uid == "etcd/2b"

    def test_readiness_says_what_is_missing_before_etcd_answers(self, etcd_sidecar: Sidecar) -> None:
        problems = etcd_sidecar.readiness_problems()
        assert any(p.startswith("not registered in etcd") for p in problems)
        # DISCOVERY_WATCH=auto: readiness is the registration alone, and starting the watches (the first peer
        # request) never changes it.
        assert not etcd_sidecar.watching and "watches not synced yet" not in problems
        etcd_sidecar._start_watches("a test")
        try:
            assert etcd_sidecar.readiness_problems() == problems
        finally:
            for source in etcd_sidecar.backend.sources:
                source.stop(timeout=2)

    def test_the_own_keys_watch_follows_the_publisher(self, etcd_sidecar: Sidecar) -> None:
        """The publisher's own keys are watched whatever DISCOVERY_WATCH says: told when they change."""
        (own,) = etcd_sidecar.backend.own_watches
        publisher = etcd_sidecar.publisher
        assert isinstance(own, OwnKeysWatch) and isinstance(publisher, EtcdPublisher)
        assert own.publisher is publisher and publisher.own_watch is own
        publisher._registration_changed()  # what the publisher calls when its keys or its lease change
        assert own._refresh.is_set()
        assert publisher.health.listener == etcd_sidecar.hub.set_registration_health


def test_always_waits_for_the_first_sync(tmp_path: pathlib.Path) -> None:
    """DISCOVERY_WATCH=always (routers, frontends): ready only once the peer set is loaded."""
    sidecar = Sidecar(load_settings(environ=etcd_env(tmp_path, DISCOVERY_WATCH="always")))
    try:
        assert "watches not synced yet" in sidecar.readiness_problems()
    finally:
        sidecar.grpc.stop(grace=0.1)
        sidecar.backend.close()


def test_register_never_is_watch_only_on_etcd(tmp_path: pathlib.Path) -> None:
    """DISCOVERY_REGISTER=never: no lease, ready without one (noted), publishing refused with a meaning."""
    sidecar = Sidecar(load_settings(environ=etcd_env(tmp_path, DISCOVERY_REGISTER="never")))
    try:
        publisher = sidecar.publisher
        assert isinstance(publisher, EtcdPublisher) and publisher.watch_only
        assert sidecar.backend.own_watches == [], "no lease, no keys: nothing of its own to follow"
        assert publisher.problems() == [] and "watch-only" in publisher.notes()[0]
        with pytest.raises(NotRegistering, match="DISCOVERY_REGISTER=never"):
            publisher.publish({}, merge=True)
        assert publisher.deregister(timeout=1) is True
    finally:
        sidecar.grpc.stop(grace=0.1)
        sidecar.backend.close()


class StaticPublisher:
    """A ``Publisher`` that reports a fixed registration."""

    def __init__(self, registration: Registration) -> None:
        self.state = registration

    def registration(self) -> Registration:
        return self.state

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        raise NotImplementedError

    def problems(self) -> list[str]:
        return []


def get_self(registration: Registration | None) -> pb.GetSelfResponse:
    hub = PeerHub(PeerDirectory("h", 10, ["etcd"], join=InstanceJoin()), self_uid="")
    publisher = StaticPublisher(registration) if registration is not None else None
    service = DiscoveryService(hub, publisher, PodIdentity("worker-0", "demo", ""), Metrics())
    return asyncio.run(service.GetSelf(pb.GetSelfRequest(), None))  # type: ignore[arg-type]


class TestGetSelf:
    """GetSelf reports what the publisher says this instance is: no backend branch in the service."""

    def test_the_publisher_decides_the_instance_id_on_etcd(self) -> None:
        """On etcd the instance ID is the lease (64 bits, not the name's hash)."""
        lease = 2687419807939130247
        me = get_self(Registration(True, "7", {}, name="worker-0", instance_id=lease, peer_uid=f"etcd/{lease:x}"))
        assert (me.instance_id, me.instance_id_hex, me.registered) == (lease, f"{lease:x}", True)
        assert me.uid == f"etcd/{lease:x}"  # as Peer.uid of this instance

    def test_no_lease_yet_is_instance_id_zero(self) -> None:
        me = get_self(Registration(False, "", {}, name="worker-0", peer_uid="", instance_id=0))
        assert (me.instance_id, me.registered) == (0, False)

    def test_the_etcd_publisher_reports_its_lease(self) -> None:
        """The lease publisher says so itself: the lease, its peer key, the pod's name (0 and "" without one)."""
        publisher = EtcdPublisher(None, {}, lease_ttl=10, name="worker-0")  # type: ignore[arg-type]
        me = get_self(publisher.registration())
        assert (me.name, me.instance_id, me.uid, me.registered) == ("worker-0", 0, "", False)
        publisher._lease = 0x2A
        me = get_self(publisher.registration())
        assert (me.instance_id, me.instance_id_hex, me.uid) == (0x2A, "2a", "etcd/2a")

    @pytest.mark.parametrize(
        ("metadata_name", "uid"), [("worker-0", "uid-0"), ("worker-0-engine", "uid-0/engine")]
    )
    def test_the_kubernetes_publisher_says_the_names_hash(self, metadata_name: str, uid: str) -> None:
        """The CR's publisher reports Dynamo's SipHash of the CR name, and the peer key peers know it by
        (the pod UID; ``{uid}/{container}`` for another container in container mode)."""
        registrar = KubePublisher(
            ScriptedApi().as_kube_api(),
            PodIdentity("worker-0", "demo", "uid-0"),
            {},
            {},
            "discovery-sidecar",
            Metrics(),
            metadata_name=metadata_name,
        )
        me = get_self(registrar.registration())
        assert (me.name, me.instance_id, me.uid) == (metadata_name, instance_id(metadata_name), uid)

    def test_without_a_publisher_only_the_pod_is_known(self) -> None:
        """A service built without a publisher (tests, benchmarks) reports the pod, unregistered."""
        me = get_self(None)
        assert (me.name, me.namespace, me.instance_id, me.registered) == ("worker-0", "demo", 0, False)
