"""The etcd backend against a real etcd 3.6 (the binary the project builds), one fresh etcd per test.

Registration (keys on one lease, keep-alive past the TTL, revoke, expiry, loss and re-registration,
publish), the prefix watch (across an etcd restart, across a compaction while disconnected, bad values
skipped) and the connection options (user/password authentication, TLS with client certificates).
Waits are on conditions with deadlines; the only waits on time itself are the ones whose subject is
time (a lease outliving its TTL).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from devcluster.etcd import EtcdServer
from devcluster.faults import FaultProxy
from devcluster.waiting import wait_for
from sidecar.core.directory import PeerDirectory
from sidecar.core.eventlog import ApiStatus
from sidecar.core.instance_join import InstanceJoin, instance_peer_key
from sidecar.etcd.client import EtcdClient
from sidecar.etcd.publisher import EtcdPublisher
from sidecar.etcd.settings import Endpoint, EtcdSettings
from sidecar.etcd.source import EtcdSource
from sidecar.peers.hub import PeerHub
from sidecar.peers.ports import Invalid

pytestmark = pytest.mark.integration

TTL = 2
DEADLINE = 20.0


# -- fixtures ----------------------------------------------------------------------------------------------


class Closer:
    """Stops every publisher, source, client and proxy a test made, whatever happened."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], object]] = []

    def add(self, action: Callable[[], object]) -> None:
        self.actions.append(action)

    def run(self) -> None:
        for action in reversed(self.actions):
            with contextlib.suppress(Exception):  # teardown must reach everything
                action()


@pytest.fixture
def closer() -> Iterator[Closer]:
    c = Closer()
    yield c
    c.run()


def settings_for(port: int, **kwargs: Any) -> EtcdSettings:
    return EtcdSettings(endpoints=(Endpoint("127.0.0.1", port, kwargs.pop("tls", False)),), lease_ttl=TTL, **kwargs)


def client_for(closer: Closer, port: int, **kwargs: Any) -> EtcdClient:
    client = EtcdClient(settings_for(port, **kwargs), request_timeout=3.0)
    closer.add(client.close)
    return client


def publisher_for(closer: Closer, client: EtcdClient, data: dict[str, Any], ttl: int = TTL) -> EtcdPublisher:
    publisher = EtcdPublisher(client, data, lease_ttl=ttl, backoff_max=0.5)
    closer.add(publisher.stop)
    return publisher


def start_registered(publisher: EtcdPublisher) -> int:
    publisher.start()
    assert publisher.registered.wait(DEADLINE), publisher.problems()
    lease = publisher.instance_id
    assert lease
    return lease


class Watcher:
    """An ``EtcdSource`` writing into a real hub with the etcd join: what a sidecar's clients would see."""

    def __init__(self, closer: Closer, client: EtcdClient) -> None:
        self.hub = PeerHub(PeerDirectory("test", 10_000, ("etcd",), join=InstanceJoin()), self_uid="")
        store = self.hub.store("etcd")
        self.source = EtcdSource(client, store, backoff_max=0.5, silence_timeout=10, progress_interval=1)
        closer.add(self.source.stop)
        self.source.start()
        assert self.hub.wait_synced(DEADLINE)

    def peers(self) -> dict[str, Any]:
        return {p.uid: p for p in self.hub.state().peers}

    def wait(self, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        wait_for(lambda: condition(self.peers()), DEADLINE, what)
        return self.peers()


def endpoint(ns: str, component: str, name: str, address: str = "10.0.0.1:9000") -> dict[str, Any]:
    return {
        "type": "Endpoint",
        "namespace": ns,
        "component": component,
        "endpoint": name,
        "instance_id": 0,
        "transport": {"tcp": f"{address}/{ns}/{component}/{name}"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }


def model(ns: str, component: str, name: str, display: str, suffix: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "Model",
        "namespace": ns,
        "component": component,
        "endpoint": name,
        "instance_id": 0,
        "card_json": {"display_name": display, "context_length": 8192},
    }
    if suffix:
        entry["model_suffix"] = suffix
    return entry


def worker_data(address: str = "10.0.0.1:9000", channel_id: int = 0xABC) -> dict[str, Any]:
    return {
        "endpoints": {"demo/backend/generate/0": endpoint("demo", "backend", "generate", address)},
        "model_cards": {"demo/backend/generate/0": model("demo", "backend", "generate", "llama")},
        "event_channels": {
            "kv": {
                "type": "EventChannel",
                "scope": {"kind": "component", "namespace": "demo", "component": "backend"},
                "topic": "kv-events",
                "instance_id": channel_id,  # a publisher ID: unique per publisher, whatever its process
                "transport": {"kind": "zmq", "config": {"endpoint": "tcp://10.0.0.1:5557"}},
            }
        },
    }


def complete(peers: dict[str, Any], lease: int) -> bool:
    peer = peers.get(instance_peer_key(lease))
    return peer is not None and all(peer.data[m] for m in ("endpoints", "model_cards", "event_channels"))


def keys_on(etcd: EtcdServer, lease: int) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in etcd.get_prefix("v1/").items() if v["lease"] == lease}


# -- registration ------------------------------------------------------------------------------------------
def test_registration_creates_dynamos_keys_on_one_lease_whose_id_is_the_instance_id(
    etcd: EtcdServer, closer: Closer
) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    lease = start_registered(publisher)

    stored = etcd.get_prefix("v1/")
    assert set(stored) == {
        f"v1/instances/demo/backend/generate/{lease:x}",
        f"v1/mdc/demo/backend/generate/{lease:x}",
        "v1/event_channels/namespace/demo/component/backend/topic/kv-events/abc",
    }
    assert {v["lease"] for v in stored.values()} == {lease}
    assert {v["version"] for v in stored.values()} == {1}  # each created once (create-if-absent)
    value = json.loads(stored[f"v1/instances/demo/backend/generate/{lease:x}"]["value"])
    assert value["instance_id"] == lease and value["type"] == "Endpoint" and value["device_type"] == "cuda"
    channel = json.loads(stored["v1/event_channels/namespace/demo/component/backend/topic/kv-events/abc"]["value"])
    assert channel["instance_id"] == 0xABC  # a publisher ID of its own, kept
    assert etcd.lease_ttl(lease) > 0
    assert publisher.problems() == []
    assert publisher.registration().registered


def test_keep_alive_holds_the_keys_well_past_the_ttl(etcd: EtcdServer, closer: Closer) -> None:
    # A renewal every TTL / 2: with 2 s, a 1 s stall of this loaded machine would lose the keys; 5 s leaves 2.5.
    ttl = 5
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data(), ttl=ttl)
    lease = start_registered(publisher)
    until = time.monotonic() + 2 * ttl  # the subject of this test is time itself
    while time.monotonic() < until:
        assert len(keys_on(etcd, lease)) == 3, "a key vanished while the lease was being kept alive"
        assert etcd.lease_ttl(lease) > 0
        time.sleep(0.2)  # poll: the keys are checked throughout two TTLs, not waited for
    assert publisher.instance_id == lease and publisher.leases_granted == 1


def test_deregister_revokes_the_lease_and_the_keys_are_gone_at_once(etcd: EtcdServer, closer: Closer) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    lease = start_registered(publisher)
    assert publisher.deregister()
    assert etcd.get_prefix("v1/") == {}  # no waiting: revocation deletes them in the same revision
    assert etcd.lease_ttl(lease) == -1
    assert not publisher.registered.is_set()


def test_lease_expires_when_keep_alive_stops(etcd: EtcdServer, closer: Closer) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    lease = start_registered(publisher)
    publisher.stop()  # the keep-alive thread ends; nothing revokes
    assert keys_on(etcd, lease)
    wait_for(lambda: not keys_on(etcd, lease), TTL + 10, "the keys to expire with the lease")
    assert etcd.lease_ttl(lease) == -1


def test_a_revoked_lease_is_noticed_and_the_instance_registers_again_with_a_new_id(
    etcd: EtcdServer, closer: Closer
) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    first = start_registered(publisher)
    etcd.post("/v3/lease/revoke", {"ID": str(first)})  # an operator, or etcd, took the lease away
    wait_for(lambda: publisher.instance_id not in (None, first), DEADLINE, "a new lease")
    wait_for(lambda: publisher.registered.is_set(), DEADLINE, "registration with the new lease")
    second = publisher.instance_id
    assert second and second != first
    assert set(keys_on(etcd, second)) >= {f"v1/instances/demo/backend/generate/{second:x}"}
    assert not keys_on(etcd, first)


def test_a_partition_longer_than_the_ttl_loses_the_lease_and_registering_again_heals_it(
    etcd: EtcdServer, closer: Closer
) -> None:
    proxy = FaultProxy(etcd.client_port)
    closer.add(proxy.close)
    publisher = publisher_for(closer, client_for(closer, proxy.port), worker_data())
    first = start_registered(publisher)
    proxy.refuse()
    wait_for(lambda: not publisher.registered.is_set(), TTL + 10, "the publisher to notice the lost lease")
    assert "lost" in publisher.problems()[0]
    wait_for(lambda: not keys_on(etcd, first), TTL + 10, "etcd to expire the unrenewed lease")
    proxy.accept()
    wait_for(lambda: publisher.registered.is_set(), DEADLINE, "registration once etcd is reachable again")
    second = publisher.instance_id
    assert second and second != first
    assert f"v1/instances/demo/backend/generate/{second:x}" in keys_on(etcd, second)


def test_publish_rewrites_the_keys_and_deletes_those_no_longer_there(etcd: EtcdServer, closer: Closer) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    lease = start_registered(publisher)
    before = keys_on(etcd, lease)

    registration = publisher.publish(
        {
            "endpoints": {"demo/backend/generate/0": endpoint("demo", "backend", "generate", "10.0.0.9:9000")},
            "model_cards": {"lora": model("demo", "backend", "generate", "llama-lora", suffix="lora-a")},
        },
        merge=False,
    )
    after = keys_on(etcd, lease)
    assert set(after) == {
        f"v1/instances/demo/backend/generate/{lease:x}",
        f"v1/mdc/demo/backend/generate/{lease:x}/lora-a",
    }
    endpoint_key = f"v1/instances/demo/backend/generate/{lease:x}"
    assert after[endpoint_key]["version"] == before[endpoint_key]["version"] + 1
    assert json.loads(after[endpoint_key]["value"])["transport"]["tcp"].startswith("10.0.0.9:9000")
    assert registration.registered and registration.resource_version

    publisher.publish({"model_cards": {"lora": None}}, merge=True)  # RFC 7386: remove one entry
    assert set(keys_on(etcd, lease)) == {endpoint_key}
    unchanged = keys_on(etcd, lease)[endpoint_key]["mod_revision"]
    publisher.publish({}, merge=True)  # nothing changes: nothing is written
    assert keys_on(etcd, lease)[endpoint_key]["mod_revision"] == unchanged


def test_publish_refuses_a_key_another_instance_holds_and_keeps_the_previous_metadata(
    etcd: EtcdServer, closer: Closer
) -> None:
    publisher = publisher_for(closer, client_for(closer, etcd.client_port), {"endpoints": {}})
    lease = start_registered(publisher)
    squatter = client_for(closer, etcd.client_port).lease_grant(30).ID
    etcd.put("v1/event_channels/namespace/demo/topic/kv/abc", "{}", lease=squatter)
    data = {
        "event_channels": {
            "kv": {
                "type": "EventChannel",
                "scope": {"kind": "namespace", "name": "demo"},
                "topic": "kv",
                "instance_id": 0xABC,
                "transport": {"kind": "zmq", "config": {"endpoint": "tcp://h:1"}},
            }
        }
    }
    with pytest.raises(Invalid, match=f"already registered by instance {squatter:x}"):
        publisher.publish(data, merge=False)
    assert publisher.registration().data == {"endpoints": {}}
    assert not keys_on(etcd, lease)


# -- the watch ---------------------------------------------------------------------------------------------
def test_the_source_sees_instances_come_change_and_go_across_an_etcd_restart(
    etcd: EtcdServer, closer: Closer
) -> None:
    watcher = Watcher(closer, client_for(closer, etcd.client_port))
    # A lease outlives an etcd restart when its TTL is longer than the outage (etcd keeps leases on disk
    # and renews them all when a leader is elected); a 2 s lease would be lost, and re-registered.
    a = publisher_for(closer, client_for(closer, etcd.client_port), worker_data("10.0.0.1:9000"), ttl=60)
    lease_a = start_registered(a)
    # One registration writes three buckets in one revision; each bucket is watched on its own (as
    # Dynamo watches them), so the peer may show its endpoints before its model card: wait for all.
    peers = watcher.wait(lambda p: complete(p, lease_a), "instance A with its three keys")
    peer = peers[instance_peer_key(lease_a)]
    assert peer.instance_id == lease_a
    assert set(peer.data) == {"endpoints", "model_cards", "event_channels", "event_sources"}
    assert peer.data["endpoints"][f"demo/backend/generate/{lease_a:x}"]["instance_id"] == lease_a
    assert peer.data["event_channels"]["namespace/demo/component/backend/topic/kv-events/abc"]["topic"] == "kv-events"

    etcd.stop()
    wait_for(lambda: watcher.hub.status().status is ApiStatus.DEGRADED, DEADLINE, "the stream to say DEGRADED")
    assert instance_peer_key(lease_a) in watcher.peers()  # peers are kept while etcd is away
    etcd.start()
    wait_for(lambda: watcher.hub.status().status is ApiStatus.CONNECTED, DEADLINE, "CONNECTED again")
    assert a.instance_id == lease_a and instance_peer_key(lease_a) in watcher.peers()

    b = publisher_for(closer, client_for(closer, etcd.client_port), worker_data("10.0.0.2:9000", channel_id=0xDEF))
    lease_b = start_registered(b)
    watcher.wait(lambda p: instance_peer_key(lease_b) in p, "instance B, added after the restart")
    a.publish({"model_cards": {"demo/backend/generate/0": model("demo", "backend", "generate", "mistral")}}, merge=True)
    watcher.wait(
        lambda p: p[instance_peer_key(lease_a)].data["model_cards"][f"demo/backend/generate/{lease_a:x}"]["card_json"][
            "display_name"
        ]
        == "mistral",
        "A's model card update",
    )
    a.deregister()
    peers = watcher.wait(lambda p: instance_peer_key(lease_a) not in p, "A's removal")
    assert set(peers) == {instance_peer_key(lease_b)}


def test_the_source_relists_when_its_revision_was_compacted_while_it_was_away(
    etcd: EtcdServer, closer: Closer
) -> None:
    proxy = FaultProxy(etcd.client_port)
    closer.add(proxy.close)
    watcher = Watcher(closer, client_for(closer, proxy.port))
    writer = client_for(closer, etcd.client_port)
    a = publisher_for(closer, writer, worker_data())
    lease_a = start_registered(a)
    watcher.wait(lambda p: instance_peer_key(lease_a) in p, "instance A")
    relists = watcher.source.relists

    proxy.refuse()  # the watcher is cut off; etcd and the writers go on
    wait_for(lambda: watcher.hub.status().status is ApiStatus.DEGRADED, DEADLINE, "DEGRADED while cut off")
    a.deregister()
    b = publisher_for(closer, writer, worker_data("10.0.0.2:9000"))
    lease_b = start_registered(b)
    etcd.compact()  # the history the watcher would resume from is gone
    proxy.accept()

    peers = watcher.wait(lambda p: set(p) == {instance_peer_key(lease_b)}, "the relisted state: B only")
    assert watcher.source.relists > relists
    assert peers[instance_peer_key(lease_b)].instance_id == lease_b
    wait_for(lambda: watcher.hub.status().status is ApiStatus.CONNECTED, DEADLINE, "CONNECTED again")


def test_bad_values_under_the_prefix_are_logged_and_skipped_while_other_peers_stay(
    etcd: EtcdServer, closer: Closer
) -> None:
    a = publisher_for(closer, client_for(closer, etcd.client_port), worker_data())
    lease_a = start_registered(a)
    writer = EtcdClient(settings_for(etcd.client_port))
    closer.add(writer.close)
    junk_lease = writer.lease_grant(60).ID
    etcd.put(f"v1/instances/demo/backend/generate/{junk_lease:x}", "not json {", lease=junk_lease)
    with structlog.testing.capture_logs() as logs:
        watcher = Watcher(closer, client_for(closer, etcd.client_port))
        assert set(watcher.peers()) == {instance_peer_key(lease_a)}  # the list skipped the bad value
        wrong_type = json.dumps({**model("demo", "backend", "generate", "x"), "type": "Endpoint"})
        etcd.put(f"v1/mdc/demo/backend/generate/{junk_lease:x}", wrong_type, lease=junk_lease)
        good = json.dumps({**endpoint("demo", "backend", "other"), "instance_id": junk_lease})
        etcd.put(f"v1/instances/demo/backend/other/{junk_lease:x}", good, lease=junk_lease)
        peers = watcher.wait(lambda p: instance_peer_key(junk_lease) in p, "the junk lease's one good key")
        # the buckets are watched separately: the bad model card may come before or after the good key
        wait_for(lambda: watcher.source.bad_values >= 2, DEADLINE, "the bad model card to be seen and skipped")
        peers = watcher.peers()
    assert set(peers[instance_peer_key(junk_lease)].data["endpoints"]) == {f"demo/backend/other/{junk_lease:x}"}
    assert peers[instance_peer_key(junk_lease)].data["model_cards"] == {}
    assert instance_peer_key(lease_a) in peers
    skipped = {e["key"]: e["reason"] for e in logs if e["event"].startswith("bad value")}
    assert "not JSON" in skipped[f"v1/instances/demo/backend/generate/{junk_lease:x}"]
    assert "type must be 'Model'" in skipped[f"v1/mdc/demo/backend/generate/{junk_lease:x}"]


# -- connection options ------------------------------------------------------------------------------------
def test_user_and_password_authentication(etcd: EtcdServer, closer: Closer) -> None:
    etcd.enable_auth("root", "root-pw")
    etcd.add_user("worker", "worker-pw")
    settings, warnings = EtcdSettings.from_env(
        {
            "ETCD_ENDPOINTS": f"http://127.0.0.1:{etcd.client_port}",
            "ETCD_AUTH_USERNAME": "worker",
            "ETCD_AUTH_PASSWORD": "worker-pw",
            "ETCD_LEASE_TTL": str(TTL),
        }
    )
    assert warnings == []
    client = EtcdClient(settings, request_timeout=3.0)
    closer.add(client.close)
    publisher = publisher_for(closer, client, worker_data())
    lease = start_registered(publisher)
    watcher = Watcher(closer, client)
    watcher.wait(lambda p: instance_peer_key(lease) in p, "the instance, read with the same credentials")

    refused = publisher_for(closer, client_for(closer, etcd.client_port, username="worker", password="nope"), {})
    refused.start()
    wait_for(lambda: bool(refused.problems()) and "credentials" in refused.problems()[0], DEADLINE, "a clear refusal")


def test_tls_with_client_certificates_given_as_pem_text(
    etcd_bin: pathlib.Path, tmp_path: pathlib.Path, closer: Closer
) -> None:
    server = EtcdServer(tmp_path / "etcd-tls", bin_dir=etcd_bin, tls=True)
    server.start()
    closer.add(server.stop)
    assert server.pki is not None
    settings, warnings = EtcdSettings.from_env(
        {
            "ETCD_ENDPOINTS": server.url,
            "ETCD_AUTH_CA": server.pki.ca.read_text(),  # PEM text, as Dynamo passes it
            "ETCD_AUTH_CLIENT_CERT": server.pki.client_cert.read_text(),
            "ETCD_AUTH_CLIENT_KEY": str(server.pki.client_key),  # a path is accepted too
            "ETCD_LEASE_TTL": str(TTL),
        }
    )
    assert warnings == [] and settings.tls
    client = EtcdClient(settings, request_timeout=3.0)
    closer.add(client.close)
    publisher = publisher_for(closer, client, worker_data())
    lease = start_registered(publisher)
    watcher = Watcher(closer, client)
    watcher.wait(lambda p: instance_peer_key(lease) in p, "the instance over TLS")

    untrusted = EtcdClient(EtcdSettings(endpoints=settings.endpoints, lease_ttl=TTL), request_timeout=3.0)
    closer.add(untrusted.close)
    refused = publisher_for(closer, untrusted, {})
    refused.start()
    wait_for(lambda: bool(refused.problems()) and "etcd" in refused.problems()[0], DEADLINE, "a refusal without the CA")
    assert not refused.registered.is_set()
