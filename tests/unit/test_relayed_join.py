"""A follower's peers: decoded from the relay's messages and passed through the relayed join.

What makes failover invisible to a main container: the same peer decoded from two replicas' messages is
equal, so a new replica's snapshot, replacing the source's set, diffs to only what really changed.
"""

from __future__ import annotations

from sidecar.core.directory import PeerDirectory
from sidecar.core.eventlog import PeerChange
from sidecar.core.peer import Document, Peer, PeerState, PortInfo
from sidecar.core.records import RelayedPeer
from sidecar.core.relayed_join import RelayedJoin
from sidecar.core.workers import Worker
from sidecar.kube.upstream import peer_from_pb
from sidecar.serve.wire import encode_peer


def peer(name: str, ip: str = "10.0.0.1", data: dict | None = None) -> Peer:
    value = data if data is not None else {"endpoints": {}, "n": 1.0, "big": 2**60}
    return Peer(
        uid=f"uid-{name}",
        name=name,
        namespace="ns",
        instance_id=123,
        addresses=(ip,),
        ports=(PortInfo(8000, "http", "TCP", "h2c"),),
        labels={"role": "prefill"},
        state=PeerState.DRAINING,
        document=Document(value),
        node_name="n",
        zone="z",
        hostname="h",
        container="c",
        workers=(Worker(url=f"http://{ip}:8000", port=8000, protocol="http", bootstrap_port=9000, model_id="m"),),
    )


def relayed(p: Peer) -> RelayedPeer:
    return RelayedPeer(peer_from_pb(encode_peer(p)))


def test_a_peer_survives_the_wire_unchanged() -> None:
    original = peer("w-0")
    decoded = peer_from_pb(encode_peer(original))
    assert decoded == original
    assert decoded.data_json == original.data_json, "data from the exact JSON text (1.0 stays 1.0, 2**60 exact)"
    assert decoded.labels == original.labels and decoded.workers[0].bootstrap_port == 9000


def test_a_worker_without_a_bootstrap_port_keeps_none() -> None:
    original = peer("w-0")
    original = Peer(**{**original.__dict__, "workers": (Worker(url="http://x:1", port=1, protocol="http"),)})
    assert peer_from_pb(encode_peer(original)).workers[0].bootstrap_port is None


def directory() -> PeerDirectory:
    return PeerDirectory("h", 100, ["upstream"], join=RelayedJoin())


def test_another_replicas_snapshot_diffs_to_the_real_changes() -> None:
    d = directory()
    d.replace("upstream", {f"uid-{n}": relayed(peer(n)) for n in ("a", "b", "c")})
    assert d.synced and set(d.peers) == {"uid-a", "uid-b", "uid-c"}
    # The new replica's snapshot: a gone, b moved, c as it was, d new.
    entries = d.replace(
        "upstream",
        {"uid-b": relayed(peer("b", ip="10.0.0.2")), "uid-c": relayed(peer("c")), "uid-d": relayed(peer("d"))},
    )
    changes = {e.change.uid: e.change for e in entries if isinstance(e.change, PeerChange)}
    assert set(changes) == {"uid-a", "uid-b", "uid-d"}, "c, equal on both replicas, is no event"
    assert changes["uid-a"].after is None and changes["uid-d"].before is None
    assert changes["uid-b"].after is not None and changes["uid-b"].after.addresses == ("10.0.0.2",)


def test_deltas_pass_through() -> None:
    d = directory()
    d.replace("upstream", {})
    assert [e.change.uid for e in d.apply("upstream", "uid-a", relayed(peer("a")))] == ["uid-a"]
    assert d.apply("upstream", "uid-a", relayed(peer("a"))) == [], "the same peer again: nothing"
    assert [e.change.uid for e in d.apply("upstream", "uid-a", None)] == ["uid-a"]
    assert d.peers == {}
