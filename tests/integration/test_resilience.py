"""Faults between the sidecar and the real kube-apiserver, and the daemon's outward behaviour.

The API server here is the real one; a loopback TCP proxy (devcluster.faults) in front of it produces
what the real server cannot be asked to: a silently dead watch connection, and an unreachable server
at start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import grpc
import pytest

from devcluster.cluster import ControlPlane
from devcluster.faults import FaultProxy
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder
from tests.integration.test_peer_stream import register_like_dynamo

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[FaultProxy]:
    p = FaultProxy(control_plane.apiserver_port)
    yield p
    p.close()


def metric(process, name: str, **labels: str) -> float:
    """The value of one sample of ``name`` with exactly ``labels`` on the sidecar's /metrics (0 if absent)."""
    _, text = process.http_get("/metrics")
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if found == labels:
            return float(match.group(2))
    return 0.0


def start_via_proxy(sidecars: Sidecars, pod: dict, proxy: FaultProxy, **env: str):
    return sidecars.start(pod, "w", extra_env=env, server=proxy.server)


def test_silent_watch_is_detected_and_restarted(
    namespace: str, cluster: Cluster, sidecars: Sidecars, proxy: FaultProxy
) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    observer = start_via_proxy(
        sidecars,
        cluster.start_pod(namespace, "obs", {"app": "w"}),
        proxy,
        DISCOVERY_WATCH_SILENCE_TIMEOUT="3s",
    ).wait_ready()
    stream = StreamRecorder(observer.target)
    try:
        stream.wait_names(set())
        # A change seen through both watches proves they are open, so the freeze below catches them.
        register_like_dynamo(cluster, cluster.start_pod(namespace, "w-early", {"app": "w"}))
        stream.wait_names({"w-early"})
        frozen = proxy.freeze_existing()
        assert frozen >= 2, "both watches run over the proxy"
        register_like_dynamo(cluster, cluster.start_pod(namespace, "w-late", {"app": "w"}))
        # The change can only arrive over a new connection: after the silence was noticed.
        stream.wait_names({"w-early", "w-late"}, timeout=60)
        restarts = sum(
            metric(observer, "discovery_watch_restarts_total", source=source, reason="silent")
            for source in ("endpointslices", "dynamoworkermetadatas")
        )
        assert restarts >= 1
        assert not any(u.kind == "status" for u in stream.updates), "a silent watch is not an outage"
    finally:
        stream.close()


def test_starts_without_api_server_and_becomes_ready_when_it_appears(
    namespace: str, cluster: Cluster, sidecars: Sidecars, proxy: FaultProxy
) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    proxy.refuse()
    process = start_via_proxy(sidecars, cluster.start_pod(namespace, "lonely", {"app": "w"}), proxy)
    wait_for(lambda: process.http_get("/readyz")[0] == 503, 30, what="/readyz to answer 503")
    wait_for(lambda: "cannot reach the API server" in process.http_get("/readyz")[1], 30, what="the reason")
    assert process.http_get("/healthz")[0] == 200, "alive while waiting"
    assert process.process is not None and process.process.poll() is None, "no crash"
    with DiscoveryClient(process.target) as client, pytest.raises(grpc.RpcError) as not_yet:
        client.list_peers(timeout=1)
    assert not_yet.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    proxy.accept()
    process.wait_ready(60)
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "lonely")) is not None


def test_sigterm_while_streaming_deregisters_then_ends_streams(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    a = sidecars.start(cluster.start_pod(namespace, "a", {"app": "w"}), "w").wait_ready()
    b = sidecars.start(cluster.start_pod(namespace, "b", {"app": "w"}), "w").wait_ready()
    on_b = StreamRecorder(b.target)
    on_a = StreamRecorder(a.target, reconnect=False)
    try:
        on_b.wait_names({"a"})
        on_a.wait_names({"b"})
        assert a.terminate(timeout=25) == 0
        on_b.wait_names(set())
        wait_for(lambda: on_a.error is not None, 10, what="a's stream to end")
        assert isinstance(on_a.error, grpc.RpcError)
        assert on_a.error.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in on_a.error.details()
        events = [e.get("event") for e in a.log_events()]
        assert events.index("deregistered") < events.index("stopped")
    finally:
        on_a.close()
        on_b.close()


def test_http_endpoints(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    process = sidecars.start(cluster.start_pod(namespace, "h", {"app": "w"}), "w").wait_ready()
    # The first /debug/peers request starts the watches (DISCOVERY_WATCH=auto): the peer then comes as events.
    assert process.http_get("/debug/peers")[0] == 200
    register_like_dynamo(cluster, cluster.start_pod(namespace, "peer", {"app": "w", "role": "decode"}))
    wait_for(lambda: '"name": "peer"' in process.http_get("/debug/peers")[1], 30, what="the peer in /debug/peers")
    status, body = process.http_get("/debug/peers")
    listing = json.loads(body)
    assert status == 200 and listing["synced"] and listing["api_status"] == "connected"
    assert {p["name"]: p["self"] for p in listing["peers"]} == {"h": True, "peer": False}
    assert process.http_get("/healthz") == (200, "ok\n")
    assert process.http_get("/readyz") == (200, "ok\n")
    # The gauges follow the peer set just after it changes (outside the hub's lock): wait for them.
    ready_gauge = 'discovery_peers{state="ready"} 2.0'
    wait_for(lambda: ready_gauge in process.http_get("/metrics")[1], 10, what="the ready-peers gauge")
    _, metrics = process.http_get("/metrics")
    for name in (
        'discovery_peers{state="ready"} 2.0',
        "discovery_registered 1.0",
        "discovery_api_connected 1.0",
        'discovery_watch_events_total{source="endpointslices",type="',
        "discovery_propagation_lag_seconds_bucket",
        "discovery_stream_subscribers",
    ):
        assert name in metrics, name
    with DiscoveryClient(process.target) as client:
        reply = client.list_peers(pb.PeerFilter(selector="role=decode"))
    assert [p.name for p in reply.peers] == ["peer"]
