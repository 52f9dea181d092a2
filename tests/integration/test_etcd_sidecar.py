"""The sidecar *process* on the etcd backend, against a real etcd 3.6: what an etcd-backed pod runs.

``DYN_DISCOVERY_BACKEND=etcd`` and ``ETCD_ENDPOINTS``, no API server anywhere. Registration under
Dynamo's keys on a lease whose ID is the instance ID (``GetSelf``), peers from the ``v1/`` prefixes on
``WatchPeers``, ``PublishMetadata`` at run time, the lease revoked on SIGTERM (the keys go at once,
long before the TTL), a partition through the fault proxy that loses the lease (``/readyz`` and the
stream say so) healed by registering again under a new instance ID, and bad values under the prefixes
skipped without losing other peers. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devcluster.etcd import EtcdServer
from devcluster.faults import FaultProxy
from devcluster.sidecars import SidecarProcess, launch_etcd_sidecar
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, PeerSetView
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

NAMESPACE = "demo"


def endpoint_entry(component: str, address: str) -> dict[str, Any]:
    """An endpoint entry as Dynamo writes it; instance_id 0 and the key's /0 stand for "my lease"."""
    return {
        "type": "Endpoint",
        "namespace": NAMESPACE,
        "component": component,
        "endpoint": "generate",
        "instance_id": 0,
        "transport": {"tcp": f"{address}/0/{NAMESPACE}/{component}/generate"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }


def metadata(component: str, address: str = "127.0.0.1:9000") -> dict[str, Any]:
    return {"endpoints": {f"{NAMESPACE}/{component}/generate/0": endpoint_entry(component, address)}}




class World:
    """The etcd, the sidecars and the streams of one test; always torn down."""

    def __init__(self, etcd: EtcdServer, work_dir: pathlib.Path) -> None:
        self.etcd = etcd
        self.work_dir = work_dir
        self.sidecars: list[SidecarProcess] = []
        self.closers: list[Callable[[], object]] = []

    def sidecar(
        self, name: str, data: dict[str, Any], endpoints: str = "", ttl: int = 30, env: dict[str, str] | None = None
    ) -> SidecarProcess:
        process = launch_etcd_sidecar(
            name,
            NAMESPACE,
            endpoints or self.etcd.url,
            self.work_dir / "sidecars",
            metadata=data,
            extra_env={"ETCD_LEASE_TTL": str(ttl), "DISCOVERY_WATCH_SILENCE_TIMEOUT": "5s", **(env or {})},
        )
        self.sidecars.append(process)
        return process.wait_ready()

    def stream(self, process: SidecarProcess, peer_filter: pb.PeerFilter | None = None) -> StreamRecorder:
        recorder = StreamRecorder(process.target, peer_filter)
        self.closers.append(recorder.close)
        return recorder

    def client(self, process: SidecarProcess) -> DiscoveryClient:
        client = DiscoveryClient(process.target)
        self.closers.append(client.close)
        return client

    def keys(self, prefix: str = "v1/") -> dict[str, dict[str, Any]]:
        return self.etcd.get_prefix(prefix)

    def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):  # teardown must reach everything
                close()
        for process in self.sidecars:
            try:
                process.terminate(timeout=15)
            except Exception:  # noqa: BLE001 - teardown must reach every process
                process.kill()


@pytest.fixture
def world(etcd: EtcdServer, tmp_path: pathlib.Path) -> Iterator[World]:
    w = World(etcd, tmp_path)
    yield w
    w.close()


def data_of(peer: pb.Peer) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(peer.data_json or "{}")
    return value


class TestRegistration:
    def test_instance_registers_under_dynamos_keys_on_its_lease_and_get_self_reports_the_lease(
        self, world: World
    ) -> None:
        """The lease ID is the instance ID: in GetSelf, in the key's hex, in the value, and as the key's lease."""
        sidecar = world.sidecar("worker-0", metadata("backend"))
        me = world.client(sidecar).get_self()
        assert me.registered and me.instance_id > 0 and me.instance_id_hex == f"{me.instance_id:x}"
        assert (me.name, me.namespace, me.uid) == ("worker-0", NAMESPACE, f"etcd/{me.instance_id:x}")  # as Peer.uid
        key = f"v1/instances/{NAMESPACE}/backend/generate/{me.instance_id:x}"
        stored = world.keys()
        assert set(stored) == {key}
        assert stored[key]["lease"] == me.instance_id
        value = json.loads(stored[key]["value"])
        assert value["instance_id"] == me.instance_id and value["type"] == "Endpoint"
        assert world.etcd.lease_ttl(me.instance_id) > 0
        status, body = sidecar.http_get("/readyz")
        assert status == 200, body
        status, body = sidecar.http_get("/debug/peers")  # this instance, flagged as self
        (listed,) = json.loads(body)["peers"]
        assert status == 200 and listed["uid"] == f"etcd/{me.instance_id:x}" and listed["self"] is True
        status, body = sidecar.http_get("/metrics")
        assert status == 200 and "discovery_registered 1.0" in body

    def test_two_sidecars_see_each_other_with_their_endpoints(self, world: World) -> None:
        """A peer is an instance: named by its lease in hex, carrying the four maps; self is excluded."""
        a = world.sidecar("worker-a", metadata("prefill", "10.0.0.1:9000"))
        b = world.sidecar("worker-b", metadata("decode", "10.0.0.2:9000"))
        b_id = world.client(b).get_self().instance_id
        stream = world.stream(a)
        stream.wait_names({f"{b_id:x}"})
        peer = stream.peers()[f"{b_id:x}"]
        assert peer.instance_id == b_id and peer.uid == f"etcd/{b_id:x}"
        assert (peer.namespace, list(peer.addresses), list(peer.ports)) == ("", [], [])
        data = data_of(peer)
        assert set(data) == {"endpoints", "model_cards", "event_channels", "event_sources"}
        entry = data["endpoints"][f"{NAMESPACE}/decode/generate/{b_id:x}"]
        assert entry["instance_id"] == b_id and entry["component"] == "decode"

    def test_self_is_the_instance_of_the_current_lease(self, world: World) -> None:
        """``include_self`` shows this instance (``etcd/{lease:x}``); without it the stream leaves it out."""
        a = world.sidecar("worker-a", metadata("prefill"))
        a_id = world.client(a).get_self().instance_id
        with_self = world.stream(a, pb.PeerFilter(include_self=True))
        with_self.wait_names({f"{a_id:x}"})
        without = world.stream(a)
        without.wait_until(lambda r: r.names() == {}, what="an empty snapshot without self")


    def test_dynamos_filters_work_as_on_kubernetes(self, world: World) -> None:
        """filter.endpoint (ns.comp.ep or dyn://) and filter.model select etcd peers by their data."""
        router = world.sidecar("router", {})
        prefill = world.sidecar("prefill-0", metadata("prefill"))
        decode_data = metadata("decode")
        decode_data["model_cards"] = {
            f"{NAMESPACE}/decode/generate/0": {
                "type": "Model",
                "namespace": NAMESPACE,
                "component": "decode",
                "endpoint": "generate",
                "instance_id": 0,
                "card_json": {"display_name": "llama"},
            }
        }
        decode = world.sidecar("decode-0", decode_data)
        p_id = world.client(prefill).get_self().instance_id
        d_id = world.client(decode).get_self().instance_id
        by_endpoint = world.stream(router, pb.PeerFilter(endpoint=f"dyn://{NAMESPACE}.prefill.generate"))
        by_model = world.stream(router, pb.PeerFilter(model="llama"))
        by_endpoint.wait_names({f"{p_id:x}"})
        by_model.wait_names({f"{d_id:x}"})
        (endpoint,) = by_endpoint.peers()[f"{p_id:x}"].endpoints
        assert (endpoint.path, endpoint.instance_id, endpoint.transport_kind) == (
            f"{NAMESPACE}.prefill.generate",
            p_id,
            "tcp",
        )
        (model,) = by_model.peers()[f"{d_id:x}"].models
        assert (model.name, model.path, model.instance_id) == ("llama", f"{NAMESPACE}.decode.generate", d_id)


class TestRunTime:
    def test_publish_metadata_rewrites_the_keys_under_the_same_lease(self, world: World) -> None:
        """A model card published at run time appears under v1/mdc and on a peer's stream."""
        a = world.sidecar("router", {})
        b = world.sidecar("worker-0", metadata("backend"))
        client = world.client(b)
        b_id = client.get_self().instance_id
        stream = world.stream(a)
        stream.wait_names({f"{b_id:x}"})
        card = {
            "type": "Model",
            "namespace": NAMESPACE,
            "component": "backend",
            "endpoint": "generate",
            "instance_id": 0,
            "card_json": {"display_name": "llama"},
        }
        client.publish_metadata({"model_cards": {f"{NAMESPACE}/backend/generate/0": card}}, merge=True)
        mdc_key = f"v1/mdc/{NAMESPACE}/backend/generate/{b_id:x}"
        assert world.keys("v1/mdc/")[mdc_key]["lease"] == b_id
        stream.wait_until(
            lambda r: bool(data_of(r.peers().get(f"{b_id:x}", pb.Peer())).get("model_cards")),
            what="the model card on the peer",
        )
        cards = data_of(stream.peers()[f"{b_id:x}"])["model_cards"]
        assert cards[f"{NAMESPACE}/backend/generate/{b_id:x}"]["card_json"] == {"display_name": "llama"}
        assert client.get_self().instance_id == b_id  # publishing keeps the lease

    def test_sigterm_revokes_the_lease_and_peers_see_the_instance_leave_at_once(self, world: World) -> None:
        """TTL 30 s: the keys are gone when the process has exited, so the lease was revoked, not expired."""
        a = world.sidecar("router", {})
        b = world.sidecar("worker-0", metadata("backend"), ttl=30)
        b_id = world.client(b).get_self().instance_id
        stream = world.stream(a)
        stream.wait_names({f"{b_id:x}"})
        assert b.terminate(timeout=15) == 0
        assert world.keys("v1/instances/") == {}
        assert world.etcd.lease_ttl(b_id) == -1
        stream.wait_names(set(), timeout=5)


class TestResume:
    def test_reconnect_with_the_last_revision_gets_exactly_what_was_missed(self, world: World) -> None:
        """The same resume as on Kubernetes: a Resumed marker and the missed deltas, no snapshot."""
        router = world.sidecar("router", {})
        keep = world.sidecar("keep", metadata("keep"))
        gone = world.sidecar("gone", metadata("gone"))
        keep_id, gone_id = (world.client(x).get_self().instance_id for x in (keep, gone))
        first = StreamRecorder(router.target, reconnect=False)
        first.wait_names({f"{keep_id:x}", f"{gone_id:x}"})
        view: PeerSetView = first.view
        first.close()
        resume_at = view.revision
        gone.terminate(15)  # lease revoked
        new = world.sidecar("new", metadata("new"))
        new_id = world.client(new).get_self().instance_id
        wanted = {f"{keep_id:x}", f"{new_id:x}"}
        resumed_view = PeerSetView()
        resumed_view.peers = dict(view.peers)
        resumed_view.revision, resumed_view.history_id = resume_at, view.history_id
        updates = []
        client = world.client(router)
        for update in client.watch(pb.PeerFilter(), reconnect=False, view=resumed_view):
            updates.append(update)
            if {p.name for p in resumed_view.peers.values()} == wanted:
                break
        assert updates[0].kind == "resumed", "the sidecar still holds that history: no snapshot"
        assert not any(u.reset for u in updates)
        assert [p.name for u in updates for p in u.added] == [f"{new_id:x}"]
        assert [p.name for u in updates for p in u.removed] == [f"{gone_id:x}"]


def log_events(process: SidecarProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in process.log_events() if e.get("event") == name]


def metric(process: SidecarProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` on the sidecar's /metrics."""
    _, text = process.http_get("/metrics")
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if labels.items() <= found.items():
            total += float(match.group(2))
    return total


class TestOwnKeys:
    """The instance's own keys are watched whatever DISCOVERY_WATCH says (here: auto, nobody asks for peers,
    no resync for an hour, a TTL of 30 s so renewals come only every 15 s): what happens to them is seen and
    healed at once, and the log and metrics say so."""

    IDLE = {"DISCOVERY_REGISTRATION_RESYNC": "1h"}

    def test_a_key_deleted_or_overwritten_from_under_an_idle_sidecar_is_back_at_once(self, world: World) -> None:
        worker = world.sidecar("worker-0", metadata("backend"), env=self.IDLE)
        lease = world.client(worker).get_self().instance_id
        key = f"v1/instances/{NAMESPACE}/backend/generate/{lease:x}"
        written = world.keys("v1/instances/")[key]
        assert written["lease"] == lease

        world.etcd.delete(key)
        wait_for(lambda: key in world.keys("v1/instances/"), 10, what="the key written again")
        again = world.keys("v1/instances/")[key]
        assert again["value"] == written["value"] and again["lease"] == lease, "the same value, the same lease"
        wait_for(lambda: log_events(worker, "registration restored"), 10, what="the log to say it is restored")
        assert [e["reason"] for e in log_events(worker, "registration lost; restoring it")] == ["keys_deleted"]

        world.etcd.put(key, b'{"someone": "else"}')  # overwritten, on no lease
        wait_for(
            lambda: world.keys("v1/instances/")[key]["value"] == written["value"], 10, what="the value restored"
        )
        assert world.keys("v1/instances/")[key]["lease"] == lease
        wait_for(lambda: len(log_events(worker, "registration restored")) == 2, 10, what="the second restore logged")
        assert metric(worker, "discovery_registration_restored_total", reason="keys_altered") == 1
        assert metric(worker, "discovery_registration_restored_total", reason="keys_deleted") == 1
        assert worker.http_get("/readyz")[0] == 200
        assert not log_events(worker, "listed etcd"), "no peer watch was started"

    def test_a_revoked_lease_is_replaced_at_once_not_at_the_next_renewal(self, world: World) -> None:
        """Revoking the lease deletes its keys: the own-keys watch sees it at once (the next renewal is up to
        15 s away); a new lease, hence a new instance ID, is registered and peers see it."""
        observer = world.sidecar("router", {})
        worker = world.sidecar("worker-0", metadata("backend"), env=self.IDLE)
        old = world.client(worker).get_self().instance_id
        others = world.stream(observer)
        others.wait_names({f"{old:x}"})

        world.etcd.post("/v3/lease/revoke", {"ID": str(old)})
        new = wait_for(
            lambda: (i := world.client(worker).get_self().instance_id) not in (0, old) and i, 8, what="a new lease"
        )
        assert set(world.keys("v1/instances/")) == {f"v1/instances/{NAMESPACE}/backend/generate/{new:x}"}
        others.wait_names({f"{new:x}"})
        assert f"{old:x}" in [p.name for u in others.updates for p in u.removed], "the old instance left"
        assert log_events(worker, "etcd lease lost")
        wait_for(lambda: log_events(worker, "registration restored"), 10, what="the log to say it is restored")
        (lost,) = log_events(worker, "registration lost; restoring it")
        assert lost["level"] == "warning"
        assert metric(worker, "discovery_registration_lost_total", reason="lease_lost") == 1
        assert not [e for e in worker.log_events() if e.get("level") == "error"], "healed: nobody needs to act"


class TestFaults:
    def test_a_partition_longer_than_the_ttl_is_reported_and_healed_with_a_new_instance_id(
        self, world: World
    ) -> None:
        """Lease lost: /readyz says so and the stream is DEGRADED; back: registered again, a new lease."""
        proxy = FaultProxy(world.etcd.client_port)
        world.closers.append(proxy.close)
        observer = world.sidecar("router", {})
        worker = world.sidecar("worker-0", metadata("backend"), endpoints=f"http://127.0.0.1:{proxy.port}", ttl=2)
        client = world.client(worker)
        old_id = client.get_self().instance_id
        own = world.stream(worker)
        others = world.stream(observer)
        others.wait_names({f"{old_id:x}"})
        own.wait_until(lambda r: r.updates[-1].connected, what="connected")

        proxy.refuse()

        def lease_lost() -> bool:
            status, body = worker.http_get("/readyz")
            return status == 503 and "lost" in body

        wait_for(lease_lost, 20, what="/readyz to report the lost lease")
        own.wait_until(lambda r: not r.updates[-1].connected, what="the worker's stream DEGRADED")
        others.wait_names(set(), timeout=20)  # etcd expired the lease: its keys went with it
        assert world.etcd.lease_ttl(old_id) == -1

        proxy.accept()
        worker.wait_ready(timeout=30)
        new_id = client.get_self().instance_id
        assert new_id not in (0, old_id)
        assert set(world.keys("v1/instances/")) == {f"v1/instances/{NAMESPACE}/backend/generate/{new_id:x}"}
        others.wait_names({f"{new_id:x}"})
        own.wait_until(lambda r: r.updates[-1].connected, what="the worker's stream CONNECTED again")
        assert any(e.get("event") == "etcd lease lost" for e in worker.log_events())

    def test_an_etcd_crash_longer_than_the_ttl_keeps_the_instance_and_its_id(self, world: World) -> None:
        """etcd gives every lease a fresh TTL when it comes back from a crash: the sidecar keeps its lease.

        Down longer than the TTL: /readyz says the lease is presumed lost, but once etcd answers the
        lease is still there, renewed, and the instance keeps its ID; observers never see it leave.
        (Giving up at the TTL instead, as the client alone would guess, churned every sidecar's
        instance ID on an etcd restart, while Dynamo's own workers kept theirs.)
        """
        observer = world.sidecar("router", {})
        worker = world.sidecar("worker-0", metadata("backend"), ttl=5)
        client = world.client(worker)
        ident = client.get_self().instance_id
        others = world.stream(observer)
        others.wait_names({f"{ident:x}"})

        world.etcd.kill()

        def presumed_lost() -> bool:
            status, body = worker.http_get("/readyz")
            return status == 503 and "presumed lost" in body

        wait_for(presumed_lost, 20, what="/readyz to report the unrenewed lease")
        world.etcd.start()
        worker.wait_ready(timeout=30)
        assert client.get_self().instance_id == ident
        assert world.keys("v1/instances/")[f"v1/instances/{NAMESPACE}/backend/generate/{ident:x}"]["lease"] == ident
        others.wait_until(lambda r: r.updates[-1].connected, what="the observer CONNECTED again")
        assert f"{ident:x}" in others.names()
        assert not [p.name for u in others.updates for p in u.removed], "the instance must never leave"
        assert not [e for e in worker.log_events() if e.get("event") == "etcd lease lost"]

    def test_bad_values_under_the_prefixes_are_skipped_without_losing_other_peers(self, world: World) -> None:
        """Not JSON, a wrong type tag, a missing field: logged with the key, skipped; the good peer stays."""
        a = world.sidecar("router", {})
        b = world.sidecar("worker-0", metadata("backend"))
        b_id = world.client(b).get_self().instance_id
        stream = world.stream(a)
        stream.wait_names({f"{b_id:x}"})
        bad = {
            "v1/instances/demo/bad/generate/1": "not json {",
            "v1/mdc/demo/bad/generate/2": json.dumps(endpoint_entry("bad", "1.2.3.4:1")),  # Endpoint under mdc
            "v1/instances/demo/bad/generate/3": json.dumps({"type": "Endpoint", "namespace": "demo"}),
        }
        for key, value in bad.items():
            world.etcd.put(key, value)
        good_key = f"v1/instances/{NAMESPACE}/late/generate/{b_id + 1:x}"
        late = endpoint_entry("late", "10.0.0.7:1") | {"instance_id": b_id + 1}
        world.etcd.put(good_key, json.dumps(late))  # a later good key still arrives

        def skipped() -> set[str]:
            return {e.get("key", "") for e in a.log_events() if e.get("event", "").startswith("bad value")}

        wait_for(lambda: set(bad) <= skipped(), 20, what="the three bad values logged")
        stream.wait_names({f"{b_id:x}", f"{b_id + 1:x}"})
        assert f"{b_id:x}" in stream.names()
        status, body = a.http_get("/readyz")
        assert status == 200, body


class TestEndpoints:
    def test_a_dead_first_endpoint_is_passed_over(self, world: World) -> None:
        """ETCD_ENDPOINTS is a list: the sidecar moves on from one that refuses connections."""
        dead = FaultProxy(world.etcd.client_port)
        world.closers.append(dead.close)
        dead.refuse()
        a = world.sidecar("router", {}, endpoints=f"http://127.0.0.1:{dead.port},{world.etcd.url}")
        b = world.sidecar("worker-0", metadata("backend"))
        b_id = world.client(b).get_self().instance_id
        world.stream(a).wait_names({f"{b_id:x}"})
        assert world.client(a).get_self().registered


class TestAuthentication:
    def test_user_and_password_from_the_environment(self, world: World) -> None:
        """ETCD_AUTH_USERNAME/PASSWORD: registered and watching with a user limited to Dynamo's v1/ keys."""
        world.etcd.enable_auth("root", "root-pw")
        world.etcd.add_user("worker", "worker-pw", prefix="v1/")
        auth = {"ETCD_AUTH_USERNAME": "worker", "ETCD_AUTH_PASSWORD": "worker-pw"}
        a = launch_etcd_sidecar("router", NAMESPACE, world.etcd.url, world.work_dir / "auth", extra_env=auth)
        b = launch_etcd_sidecar(
            "worker-0", NAMESPACE, world.etcd.url, world.work_dir / "auth", metadata=metadata("backend"), extra_env=auth
        )
        world.sidecars += [a, b]
        a.wait_ready()
        b.wait_ready()
        b_id = world.client(b).get_self().instance_id
        world.stream(a).wait_names({f"{b_id:x}"})

    def test_a_wrong_password_ends_start_up_saying_so(self, world: World) -> None:
        world.etcd.enable_auth("root", "root-pw")
        process = launch_etcd_sidecar(
            "worker-0",
            NAMESPACE,
            world.etcd.url,
            world.work_dir / "refused",
            extra_env={"ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": "nope"},
        )
        world.sidecars.append(process)
        assert process.process is not None and process.process.wait(30) == 1
        failures = [e for e in process.log_events() if e.get("event") == "cannot start"]
        assert failures and "ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD" in failures[0]["reason"], failures


class TestStartUp:
    def test_bad_etcd_values_are_a_clear_start_up_error_not_a_traceback(self, world: World) -> None:
        """Exit status 2 and one message naming each variable and flag, as for every setting."""
        process = launch_etcd_sidecar(
            "worker-0",
            NAMESPACE,
            "ftp://127.0.0.1:1",
            world.work_dir / "bad",
            extra_env={"ETCD_LEASE_TTL": "ten", "ETCD_AUTH_CLIENT_CERT": "/no/such.pem"},
        )
        world.sidecars.append(process)
        assert process.process is not None
        assert process.process.wait(30) == 2
        output = process.log_path.read_text()
        assert "invalid configuration:" in output and "Traceback" not in output
        assert "ETCD_LEASE_TTL (--etcd-lease-ttl)" in output
        assert "ETCD_ENDPOINTS (--etcd-endpoints)" in output
        assert "ETCD_AUTH_CLIENT_CERT (--etcd-auth-client-cert)" in output

    def test_an_unreachable_etcd_ends_start_up_after_the_timeout(self, world: World) -> None:
        """Dynamo's rule: ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS to reach etcd, then exit 1 saying why."""
        proxy = FaultProxy(world.etcd.client_port)
        world.closers.append(proxy.close)
        proxy.refuse()
        process = launch_etcd_sidecar(
            "worker-0",
            NAMESPACE,
            f"http://127.0.0.1:{proxy.port}",
            world.work_dir / "unreachable",
            extra_env={"ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "2"},
        )
        world.sidecars.append(process)
        assert process.process is not None
        assert process.process.wait(30) == 1
        failures = [e for e in process.log_events() if e.get("event") == "cannot start"]
        assert failures and "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS" in failures[0]["reason"]
        assert "Traceback" not in process.log_path.read_text()
