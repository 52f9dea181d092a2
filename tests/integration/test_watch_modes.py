"""DISCOVERY_WATCH and DISCOVERY_PEER_SELECTOR on the real API server: a pod that never asks for peers
costs the API server its registration and the watch of its own CR, and nothing else; a static peer
selector keeps other peers' objects from ever being transmitted; readiness never flips when a consumer
first asks for peers. Proven by the sidecar's own request and event metrics and by its probe."""

from __future__ import annotations

import re
import threading

import grpc
import pytest

from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.sidecars import SidecarProcess
from devcluster.waiting import wait_for
from discovery_client.client import DiscoveryClient, make_filter
from tests.conftest import Sidecars

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include ``labels``."""
    status, text = sidecar.http_get("/metrics")
    assert status == 200, text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def requests(sidecar: SidecarProcess, verb: str) -> float:
    return metric(sidecar, "discovery_api_requests_total", verb=verb)


def world(cluster: Cluster, namespace: str) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    cluster.register_like_dynamo(cluster.start_pod(namespace, "peer-1", {"app": "w", "role": "decode"}))
    wait_for(lambda: cluster.ready_pods_in_slices(namespace, "w").get("peer-1"), TIMEOUT, what="peer-1 in the slice")


def test_auto_registers_at_once_and_watches_only_from_the_first_request(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    world(cluster, namespace)
    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w").wait_ready()  # DISCOVERY_WATCH defaults to auto
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "worker-0")) is not None, "registered at once"
    wait_for(lambda: own_watch_listed(sidecar), TIMEOUT, what="the watch of its own CR")
    # A pod that never asks costs its registration and the watch of its own CR: one WATCH, no LIST.
    assert requests(sidecar, "list") == 0 and requests(sidecar, "watch") == 1
    assert requests(sidecar, "patch") >= 1

    with DiscoveryClient(sidecar.target) as client:
        names = [p.name for p in client.list_peers(make_filter("role=decode"), timeout=TIMEOUT).peers]
    assert names == ["peer-1"], "the first request starts the watches and waits for their sync"
    assert requests(sidecar, "watch") >= 3
    assert requests(sidecar, "list") == 0, "the initial state came as a streaming list (a watch), not a LIST"
    listed = [e for e in sidecar.log_events() if e.get("event") == "listed"]
    assert {e["how"] for e in listed} == {"streamed"} and len(listed) == 3
    assert {e["source"] for e in listed} == {"registration", "endpointslices", "dynamoworkermetadatas"}
    assert any(e.get("event") == "watching peers" for e in sidecar.log_events())

    assert sidecar.terminate() == 0
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "worker-0")) is None


def test_auto_without_a_request_deregisters_confirmed_by_a_get(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w").wait_ready()
    wait_for(lambda: own_watch_listed(sidecar), TIMEOUT, what="the watch of its own CR")
    assert sidecar.terminate() == 0
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "worker-0")) is None
    (done,) = [e for e in sidecar.log_events() if e.get("event") == "deregistered"]
    assert done.get("confirmed_by_watch") is True, "the watch of its own CR shows the deletion, peers or not"
    assert watch_starts(sidecar) == 0


def own_watch_listed(sidecar: SidecarProcess) -> bool:
    """The watch of the sidecar's own CR has its initial state (it runs whatever DISCOVERY_WATCH says)."""
    return any(e.get("event") == "listed" and e.get("source") == "registration" for e in sidecar.log_events())


def watch_starts(sidecar: SidecarProcess) -> int:
    """How often the log says the watches started (never without a peer request)."""
    return sum(1 for e in sidecar.log_events() if e.get("event") == "watching peers")


def test_never_registers_only_and_refuses_peer_requests_naming_the_setting(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    world(cluster, namespace)
    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w", extra_env={"DISCOVERY_WATCH": "never"}).wait_ready()
    with DiscoveryClient(sidecar.target) as client:
        assert client.get_self().registered
        with pytest.raises(grpc.RpcError) as listed:
            client.list_peers(timeout=TIMEOUT)
        assert listed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "DISCOVERY_WATCH=never" in (listed.value.details() or "")
        with pytest.raises(grpc.RpcError) as watched:
            next(iter(client.watch(reconnect=False)))
        assert watched.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status, body = sidecar.http_get("/debug/peers")
    assert status == 412 and "DISCOVERY_WATCH=never" in body
    assert requests(sidecar, "list") == 0 and requests(sidecar, "watch") == 1, "the watch of its own CR only"
    assert sidecar.terminate() == 0
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "worker-0")) is None, "deregistered all the same"


def test_a_peer_selector_is_sent_to_the_api_server(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    """Prefill peers' CRs never reach a sidecar that can only ever want decode peers."""
    cluster.create_service(namespace, "w", {"app": "w"})
    pod = cluster.start_pod(namespace, "router", {"app": "w", "role": "router"})
    sidecar = sidecars.start(
        pod, "w", extra_env={"DISCOVERY_WATCH": "always", "DISCOVERY_PEER_SELECTOR": "role=decode"}
    ).wait_ready()
    started = [e for e in sidecar.log_events() if e.get("event") == "started"]
    assert any("dynamoworkermetadatas" in w and "(role=decode)" in w for w in started[0]["watches"])
    before = metric(sidecar, "discovery_watch_events_total", source="dynamoworkermetadatas")
    for name in ("prefill-0", "prefill-1", "prefill-2"):
        cluster.register_like_dynamo(cluster.start_pod(namespace, name, {"app": "w", "role": "prefill"}))
    cluster.register_like_dynamo(cluster.start_pod(namespace, "decode-0", {"app": "w", "role": "decode"}))
    with DiscoveryClient(sidecar.target) as client:
        wait_for(
            lambda: [p.name for p in client.list_peers().peers] == ["decode-0"],
            TIMEOUT,
            what="decode-0 the only peer",
        )
        assert [p.name for p in client.list_peers(make_filter("role=prefill")).peers] == []
    received = metric(sidecar, "discovery_watch_events_total", source="dynamoworkermetadatas") - before
    assert received == 1, f"only decode-0's CR was transmitted, got {received} CR events"
    # The router's own CR is outside the selector, not outside the watch of its own CR: that one confirms it.
    assert sidecar.terminate() == 0
    assert cluster.get_or_none(WORKER_METADATA.item(namespace, "router")) is None
    (done,) = [e for e in sidecar.log_events() if e.get("event") == "deregistered"]
    assert done.get("confirmed_by_watch") is True


def test_readiness_never_flips_when_a_consumer_first_asks(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    """Under auto, the first peer request starts the watches: /readyz, polled all the while, stays 200 (a 503
    would take the pod out of its Service's endpoints and every peer would see it go and come back)."""
    world(cluster, namespace)
    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w").wait_ready()
    statuses: list[int] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            statuses.append(sidecar.http_get("/readyz")[0])
            done.wait(0.005)  # poll: as often as the machine allows, to catch a short flip

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    wait_for(lambda: len(statuses) >= 5, TIMEOUT, what="the prober to run")
    try:
        with DiscoveryClient(sidecar.target) as client:
            names = [p.name for p in client.list_peers(timeout=TIMEOUT).peers]
        assert names == ["peer-1"] and watch_starts(sidecar) == 1, "the request started the watches"
        seen = len(statuses)
        wait_for(lambda: len(statuses) >= seen + 5, TIMEOUT, what="more probes after the sync")
    finally:
        done.set()
        prober.join(5)
    assert set(statuses) == {200}, f"/readyz answered {sorted(set(statuses))} across the first request"
