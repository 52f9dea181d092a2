"""A mixed deployment with NVIDIA Dynamo's real runtime (``ai-dynamo-runtime`` 1.6.1 from PyPI).

The judge is the released runtime, run as a pod's main container would run it (``devcluster.dynamo``:
the pod's identity in ``POD_*``, ``DYN_DISCOVERY_BACKEND=kubernetes``, a kubeconfig with a pod-bound
token of ``manifests/rbac.yaml``'s service account, no NATS, no etcd), against the real control plane:

* a Dynamo worker serving ``demo.backend.generate`` with a model card is a peer in a sidecar's
  ``WatchPeers``, with Dynamo's own instance ID and its ``spec.data`` carried through exactly;
* a pod whose sidecar published Dynamo-shaped metadata is an instance of that endpoint for a Dynamo
  client (``Client.instance_ids()``), with the sidecar's instance ID and the published transport;
* a pod turning unready, ready again, and being deleted is seen by both sides, for both kinds of pods;
* a Dynamo CR whose maps are ``null`` (what server-side apply can store for ``{}``) stays a peer on both
  sides: Dynamo reads null or missing maps as empty;
* the sidecar's CR carries the same owner reference as Dynamo's for the same kind of pod;
* a pod running both (the sidecar next to a Dynamo main container, the product's deployment shape)
  stays discoverable, with Dynamo's endpoints, through a restart of its sidecar;
* a publish Dynamo would reject (one malformed entry makes Dynamo drop the whole CR) is refused;
* both sides agree on readiness: an EndpointSlice endpoint without ``conditions.ready`` is no peer.

Dynamo's processes log to files under the test's tmp_path (``dynamo/<pod>.dynamo-<mode>.{jsonl,log}``),
quoted in failure messages along with the observing sidecar's log.

Every pod here sits behind a Service labelled as Dynamo's operator labels component Services, and the
observing sidecar watches exactly what a Dynamo pod watches: the EndpointSlices labelled
``nvidia.com/dynamo-discovery-enabled=true`` (no Service name). Pods get non-loopback IPs (the
EndpointSlice controller drops loopback ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from devcluster.cluster import ControlPlane
from devcluster.dynamo import TESTED_VERSION, DynamoProcess, DynamoProcesses, runtime_version
from devcluster.objects import ENDPOINT_SLICES, SERVICES, WORKER_METADATA, Cluster
from devcluster.sidecars import SidecarProcess
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, make_filter
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

ENDPOINT = "demo.backend.generate"  # Dynamo's "namespace.component.endpoint"
MODEL = "interop-model"
APP = {"app": "dynamo-interop"}
SERVICE = "dynamo-backend"
# What Dynamo's operator puts on every component Service (EndpointSlices inherit Service labels).
DYNAMO_SERVICE_LABELS = {
    "nvidia.com/dynamo-discovery-enabled": "true",
    "nvidia.com/dynamo-discovery-backend": "kubernetes",
}
# What a Dynamo pod watches; the sidecar is told to watch the same, without a Service name.
SIDECAR_ENV = {"DISCOVERY_ENDPOINTSLICE_SELECTOR": "nvidia.com/dynamo-discovery-enabled=true"}
FRONTEND = "frontend-0"
TIMEOUT = 45.0


def test_the_runtime_under_test_is_the_release_pinned() -> None:
    version = runtime_version()
    assert version.split(".")[:2] == TESTED_VERSION.split(".")[:2], (
        f"these tests were written against {TESTED_VERSION}; {version} is installed"
    )


# -- what Dynamo writes, as DESIGN.md section 2 describes the 1.6.1 runtime's entries --------------------------
def endpoint_key(path: str, instance_id: int) -> str:
    return "/".join(path.split(".")) + f"/{instance_id:x}"


def endpoint_entry(path: str, instance_id: int, address: str) -> dict[str, Any]:
    namespace, component, endpoint = path.split(".")
    return {
        "type": "Endpoint",
        "namespace": namespace,
        "component": component,
        "endpoint": endpoint,
        "instance_id": instance_id,
        "transport": {"tcp": f"{address}/{instance_id:x}/{namespace}/{component}/{endpoint}"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }


def dynamo_metadata(path: str, instance_id: int, address: str) -> dict[str, Any]:
    return {
        "endpoints": {endpoint_key(path, instance_id): endpoint_entry(path, instance_id, address)},
        "model_cards": {},
        "event_channels": {},
        "event_sources": {},
    }


def peer_data(peer: pb.Peer | None) -> dict[str, Any]:
    return json.loads(peer.data_json) if peer is not None and peer.data_json else {}


# -- the world: a Dynamo-labelled Service, a frontend pod with a sidecar and a Dynamo client -----------------
@pytest.fixture
def dynamo(control_plane: ControlPlane, cluster: Cluster, tmp_path: Any) -> Iterator[DynamoProcesses]:
    manager = DynamoProcesses(control_plane, cluster, tmp_path / "dynamo")
    yield manager
    manager.stop_all()


class World:
    """One namespace of a mixed deployment, seen from a frontend pod by its sidecar and by Dynamo."""

    def __init__(self, namespace: str, cluster: Cluster, sidecars: Sidecars, dynamo: DynamoProcesses) -> None:
        self.namespace = namespace
        self.cluster = cluster
        self.sidecars = sidecars
        self.dynamo = dynamo
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "labels": dict(DYNAMO_SERVICE_LABELS)},
            "spec": {
                "clusterIP": "None",
                "selector": dict(APP),
                "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}],
            },
        }
        cluster.api.create(SERVICES.collection(namespace), service)
        frontend = self.pod(FRONTEND)
        self.observer = self.sidecar(frontend)
        self.stream = StreamRecorder(self.observer.target)
        self.client = dynamo.client(frontend, endpoint=ENDPOINT)
        self.client.wait_event("client_ready")

    def pod(self, name: str, ready: bool = True) -> dict[str, Any]:
        """A pod behind the Dynamo-labelled Service, Running with a non-loopback IP (10.244/16)."""
        return self.cluster.start_pod(self.namespace, name, APP, ready=ready)

    def sidecar(self, pod: dict[str, Any], env: dict[str, str] | None = None) -> SidecarProcess:
        """A sidecar watching what a Dynamo pod watches: the label selector, no Service name."""
        return self.sidecars.start(pod, "", extra_env={**SIDECAR_ENV, **(env or {})}).wait_ready()

    def set_ready(self, name: str, ready: bool) -> None:
        self.cluster.set_pod_status(self.namespace, name, ready=ready)

    def cr(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get_or_none(WORKER_METADATA.item(self.namespace, name))

    # -- the sidecar's view -------------------------------------------------------------------------
    def wait_stream(self, condition: Callable[[StreamRecorder], object], what: str, timeout: float = TIMEOUT) -> None:
        try:
            self.stream.wait_until(condition, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- observer sidecar log:\n{self.observer.log_tail(40)}") from None

    def peer(self, name: str) -> pb.Peer | None:
        return self.stream.peers().get(name)

    # -- Dynamo's view ------------------------------------------------------------------------------
    def wait_dynamo(self, condition: Callable[[set[int]], bool], what: str, timeout: float = TIMEOUT) -> set[int]:
        return self.client.wait_instance_ids(condition, timeout, f"Dynamo's instance_ids() for {ENDPOINT}: {what}")

    def dynamo_instance(self, instance_id: int) -> dict[str, Any] | None:
        return next((i for i in self.client.instances() if i["instance_id"] == instance_id), None)

    def close(self) -> None:
        self.stream.close()


@pytest.fixture
def world(namespace: str, cluster: Cluster, sidecars: Sidecars, dynamo: DynamoProcesses) -> Iterator[World]:
    w = World(namespace, cluster, sidecars, dynamo)
    yield w
    w.close()


def start_dynamo_worker(world: World, name: str, model: str | None = MODEL) -> tuple[dict[str, Any], DynamoProcess]:
    pod = world.pod(name)
    worker = world.dynamo.worker(pod, endpoint=ENDPOINT, model=model)
    if model:
        worker.wait_event("model_registered")
    worker.wait_event("serving")
    return pod, worker


def start_sidecar_worker(world: World, name: str) -> tuple[dict[str, Any], SidecarProcess, int]:
    """A pod whose main container publishes Dynamo-shaped metadata through its sidecar; returns its ID."""
    pod = world.pod(name)
    sidecar = world.sidecar(pod)
    with DiscoveryClient(sidecar.target) as client:
        me = client.get_self()
        instance_id = me.instance_id
        assert me.instance_id_hex == f"{instance_id:x}"
        client.publish_metadata(dynamo_metadata(ENDPOINT, instance_id, f"{pod['status']['podIP']}:8000"))
    return pod, sidecar, instance_id


# -- (a) Dynamo worker -> sidecar --------------------------------------------------------------------------------
def test_dynamo_worker_is_a_sidecar_peer_with_its_endpoint_and_model_card(world: World) -> None:
    pod, worker = start_dynamo_worker(world, "worker-0")
    instance_id = worker.instance_id
    key = endpoint_key(ENDPOINT, instance_id)

    def registered(r: StreamRecorder) -> bool:
        data = peer_data(r.peers().get("worker-0"))
        return key in (data.get("endpoints") or {}) and key in (data.get("model_cards") or {})

    world.wait_stream(registered, f"worker-0 with endpoint and model card {key}")
    started = [e for e in world.observer.log_events() if e.get("event") == "started"]
    assert started and started[0]["watches"][0] == (
        f"endpointslices in {world.namespace} (nvidia.com/dynamo-discovery-enabled=true)"
    ), "the sidecar watches what a Dynamo pod watches: the label selector, no Service name"
    peer = world.peer("worker-0")
    assert peer is not None
    assert peer.instance_id == instance_id, "the sidecar's instance ID for the pod is Dynamo's own"
    assert peer.instance_id_hex == f"{instance_id:x}"
    assert peer.uid == pod["metadata"]["uid"]
    assert list(peer.addresses) == [pod["status"]["podIP"]]
    assert peer.state == pb.PEER_STATE_READY

    cr = world.cr("worker-0")
    assert cr is not None
    data = peer_data(peer)
    assert data == cr["spec"]["data"], "spec.data as Dynamo wrote it, carried through exactly"
    entry = data["endpoints"][key]
    assert {k: entry[k] for k in ("type", "namespace", "component", "endpoint", "instance_id")} == {
        "type": "Endpoint",
        "namespace": "demo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": instance_id,
    }
    assert entry["transport"]["tcp"].endswith(f"/{instance_id:x}/demo/backend/generate")
    card = data["model_cards"][key]
    assert card["type"] == "Model" and card["instance_id"] == instance_id
    assert card["card_json"]["display_name"] == MODEL

    # The typed fields, read from those entries, and Dynamo's own questions asked of the sidecar: a
    # Dynamo-native worker's CR has no labels, so only the endpoint / model filters can select it.
    assert dict(peer.labels) == {}, "Dynamo-native workers label nothing"
    assert [(e.path, e.instance_id, e.transport_kind, e.transport_address) for e in peer.endpoints] == [
        (ENDPOINT, instance_id, "tcp", entry["transport"]["tcp"])
    ]
    assert [(m.name, m.path, m.instance_id) for m in peer.models] == [(MODEL, ENDPOINT, instance_id)]
    with DiscoveryClient(world.observer.target) as client:
        for peer_filter in (make_filter(endpoint=f"dyn://{ENDPOINT}"), make_filter(model=MODEL)):
            assert [p.name for p in client.list_peers(peer_filter).peers] == ["worker-0"], peer_filter
        assert list(client.list_peers(make_filter(endpoint="demo.backend.other")).peers) == []
        assert list(client.list_peers(make_filter(endpoint=ENDPOINT, model="another-model")).peers) == []

    # Dynamo's own client agrees: the same pod, the same instance ID.
    world.wait_dynamo(lambda ids: instance_id in ids, f"contains worker-0's {instance_id}")
    instance = world.dynamo_instance(instance_id)
    assert instance is not None and instance["transport"] == {"kind": "tcp", "address": entry["transport"]["tcp"]}

    # What the released runtime writes, pinned here as the reference for the sidecar's own CR.
    assert cr["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "worker-0",
            "uid": pod["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": False,
        }
    ]
    assert {m["manager"] for m in cr["metadata"]["managedFields"]} == {"dynamo-worker"}


# -- (b) sidecar -> Dynamo client ---------------------------------------------------------------------------------
def test_sidecar_pod_is_an_instance_for_a_dynamo_client(world: World) -> None:
    pod, _, instance_id = start_sidecar_worker(world, "sc-worker-0")
    world.wait_dynamo(lambda ids: instance_id in ids, f"contains sc-worker-0's {instance_id}")
    instance = world.dynamo_instance(instance_id)
    published = endpoint_entry(ENDPOINT, instance_id, f"{pod['status']['podIP']}:8000")
    assert instance == {
        "instance_id": instance_id,
        "device_type": "cuda",
        "transport": {"kind": "tcp", "address": published["transport"]["tcp"]},
    }, "Dynamo reads the published entry as written"
    # And the frontend's sidecar shows the same pod, with the same ID.
    world.wait_stream(lambda r: "sc-worker-0" in r.names(), "sc-worker-0 a peer")
    peer = world.peer("sc-worker-0")
    assert peer is not None and peer.instance_id == instance_id
    with DiscoveryClient(world.observer.target) as client:
        serving = client.list_peers(make_filter(endpoint=f"dyn://{ENDPOINT}")).peers
    assert [(p.name, [e.instance_id for e in p.endpoints]) for p in serving] == [("sc-worker-0", [instance_id])]


def test_sidecar_cr_carries_the_owner_reference_dynamo_writes(world: World) -> None:
    """Same kind of pod, same CR metadata: the sidecar's owner reference is the one the 1.6.1 runtime writes."""
    dynamo_pod, _ = start_dynamo_worker(world, "worker-0", model=None)
    sidecar_pod, _, _ = start_sidecar_worker(world, "sc-worker-0")
    dynamo_cr = wait_for(lambda: world.cr("worker-0"), TIMEOUT, what="Dynamo's CR")
    sidecar_cr = world.cr("sc-worker-0")
    assert sidecar_cr is not None

    def shape(cr: dict[str, Any], pod: dict[str, Any]) -> list[dict[str, Any]]:
        refs = [dict(ref) for ref in cr["metadata"]["ownerReferences"]]
        for ref in refs:
            assert (ref["name"], ref["uid"]) == (pod["metadata"]["name"], pod["metadata"]["uid"])
            ref["name"] = ref["uid"] = "<the pod>"
        return refs

    assert shape(sidecar_cr, sidecar_pod) == shape(dynamo_cr, dynamo_pod)


# -- (c) removal, both directions, both sides ---------------------------------------------------------------------
def test_unready_ready_and_deleted_pods_are_seen_by_both_sides(world: World) -> None:
    _, worker = start_dynamo_worker(world, "worker-0")
    dynamo_id = worker.instance_id
    _, _, sidecar_id = start_sidecar_worker(world, "sc-worker-0")
    pods = {"worker-0": dynamo_id, "sc-worker-0": sidecar_id}

    def both_see(expected: set[str]) -> None:
        ids = {pods[name] for name in expected}
        world.wait_dynamo(lambda seen: seen == ids, f"== {sorted(expected)} ({sorted(ids)})")
        world.wait_stream(lambda r: set(r.names()) == expected, f"peers == {sorted(expected)}")

    both_see({"worker-0", "sc-worker-0"})
    for name in pods:
        others = set(pods) - {name}
        world.set_ready(name, False)
        both_see(others)
        world.set_ready(name, True)
        both_see(set(pods))

    # Deleted pods: no process is stopped first (Dynamo never deletes its CR; readiness and garbage
    # collection make it go), so what both sides see is the pod's deletion itself.
    world.cluster.delete_pod(world.namespace, "worker-0", grace_seconds=0)
    both_see({"sc-worker-0"})
    world.cluster.delete_pod(world.namespace, "sc-worker-0", grace_seconds=0)
    both_see(set())


# -- null maps --------------------------------------------------------------------------------------------------
def test_dynamo_cr_with_null_maps_stays_a_peer_on_both_sides(world: World) -> None:
    """Server-side apply can store ``{}`` as ``null``; Dynamo reads null or missing maps as empty."""
    _, worker = start_dynamo_worker(world, "worker-0")
    instance_id = worker.instance_id
    key = endpoint_key(ENDPOINT, instance_id)
    world.wait_dynamo(lambda ids: instance_id in ids, "contains worker-0")
    world.wait_stream(lambda r: key in (peer_data(r.peers().get("worker-0")).get("endpoints") or {}), "worker-0")

    # Null the three other maps and move the endpoint to a new address in the same write: a reader that
    # shows the new address has read (and accepted) the version with the null maps.
    moved = f"127.0.0.1:1/{instance_id:x}/demo/backend/generate"
    patch = [{"op": "replace", "path": f"/spec/data/{m}", "value": None} for m in ("model_cards", "event_channels")]
    patch += [{"op": "add", "path": "/spec/data/event_sources", "value": None}]
    patch += [
        {"op": "replace", "path": "/spec/data/endpoints/" + key.replace("/", "~1") + "/transport/tcp", "value": moved}
    ]
    world.cluster.api.request(
        "PATCH",
        WORKER_METADATA.item(world.namespace, "worker-0"),
        body=patch,
        content_type="application/json-patch+json",
    )
    cr = world.cr("worker-0")
    assert cr is not None
    stored = cr["spec"]["data"]
    assert stored["model_cards"] is None and stored["event_channels"] is None and stored["event_sources"] is None

    wait_for(
        lambda: (world.dynamo_instance(instance_id) or {}).get("transport", {}).get("address") == moved,
        TIMEOUT,
        what="Dynamo's client to show the moved endpoint (it accepted the CR with null maps)",
    )
    world.wait_stream(
        lambda r: (
            (peer_data(r.peers().get("worker-0")).get("endpoints") or {}).get(key, {}).get("transport")
            == {"tcp": moved}
        ),
        "worker-0 still a peer, with the moved endpoint, after its maps turned null",
    )


# -- the product's shape: the sidecar next to a Dynamo main container ----------------------------------------------
def test_publish_that_dynamo_would_reject_is_refused(world: World) -> None:
    """Dynamo 1.6.1 rejects a whole CR when one entry is malformed (here: an Endpoint without ``component``).

    A pod whose metadata Dynamo rejects is invisible to every Dynamo reader, its valid entries included (and
    a malformed *update* leaves Dynamo on the last valid data). So the sidecar must refuse such a publish.
    """
    pod = world.pod("sc-worker-0")
    sidecar = world.sidecar(pod)
    with DiscoveryClient(sidecar.target) as client:
        instance_id = client.get_self().instance_id
        good = dynamo_metadata(ENDPOINT, instance_id, f"{pod['status']['podIP']}:8000")
        bad_key = endpoint_key("demo.backend.other", instance_id)
        bad = json.loads(json.dumps(good))
        bad["endpoints"][bad_key] = {
            k: v for k, v in endpoint_entry("demo.backend.other", instance_id, "x:1").items() if k != "component"
        }
        try:
            client.publish_metadata(bad)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert bad_key in (exc.details() or "") and "component" in (exc.details() or ""), exc.details()
        else:
            # Accepted: show what that does to a Dynamo reader before failing. Once Dynamo lists a marker pod
            # registered later, it has read sc-worker-0's CR too.
            _, _, marker_id = start_sidecar_worker(world, "sc-marker")
            seen = world.wait_dynamo(lambda ids: marker_id in ids, "contains the marker pod")
            consequence = (
                "Dynamo's client does not list the pod at all, not even for its valid entry"
                if instance_id not in seen
                else "Dynamo's client still lists the pod"
            )
            pytest.fail(
                f"PublishMetadata accepted an Endpoint entry without 'component' ({bad_key}); {consequence}. "
                "It must be refused with INVALID_ARGUMENT naming the entry and the field."
            )
        client.publish_metadata(good)
    world.wait_dynamo(lambda ids: instance_id in ids, "contains sc-worker-0 once its metadata is valid")
    cr = world.cr("sc-worker-0")
    assert cr is not None and cr["spec"]["data"] == good


# -- readiness: what counts as ready in an EndpointSlice -------------------------------------------------------------
def test_endpoint_with_unset_ready_condition_is_not_a_peer_on_either_side(world: World) -> None:
    """Kubernetes says an unset ``conditions.ready`` means "unknown"; Dynamo 1.6.1 counts only ``ready: true``.

    The EndpointSlice controller always sets it, so a hand-managed slice (as other controllers write them),
    labelled for Dynamo's discovery, shows the difference: both sides must agree on who is a peer.
    """
    ns = world.namespace
    unset = world.cluster.start_pod(ns, "worker-unset", {"app": "hand-managed"})  # not behind the Service
    marker = world.cluster.start_pod(ns, "worker-ready", {"app": "hand-managed"})
    unset_id = world.dynamo.worker(unset, endpoint=ENDPOINT).instance_id
    marker_id = world.dynamo.worker(marker, endpoint=ENDPOINT).instance_id
    for name in ("worker-unset", "worker-ready"):
        wait_for(lambda n=name: world.cr(n), TIMEOUT, what=f"{name}'s CR")

    def endpoint(pod: dict[str, Any], conditions: dict[str, bool]) -> dict[str, Any]:
        meta = pod["metadata"]
        return {
            "addresses": [pod["status"]["podIP"]],
            "conditions": conditions,
            "targetRef": {"kind": "Pod", "name": meta["name"], "namespace": ns, "uid": meta["uid"]},
        }

    hand_made = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "hand-managed",
            "labels": {
                **DYNAMO_SERVICE_LABELS,
                "kubernetes.io/service-name": "hand-managed",
                "endpointslice.kubernetes.io/managed-by": "hand.test.example",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [endpoint(unset, {}), endpoint(marker, {"ready": True})],
    }
    world.cluster.api.create(ENDPOINT_SLICES.collection(ns), hand_made)
    seen = world.wait_dynamo(lambda ids: marker_id in ids, "contains worker-ready (ready: true)")
    assert unset_id not in seen, "Dynamo 1.6.1 counts an endpoint only when conditions.ready is true"
    world.wait_stream(lambda r: "worker-ready" in r.names(), "worker-ready a peer")
    assert "worker-unset" not in world.stream.names(), (
        "an endpoint without conditions.ready is a peer for the sidecar but not an instance for Dynamo"
    )


# -- the product's shape: the sidecar next to a Dynamo main container -------------------------------------------------
def managers(cr: dict[str, Any] | None) -> set[str]:
    """The field managers that own some of the CR's spec."""
    entries = ((cr or {}).get("metadata") or {}).get("managedFields") or []
    return {e["manager"] for e in entries if "f:spec" in (e.get("fieldsV1") or {})}


def never_removed(world: World, name: str) -> bool:
    return not any(p.name == name for u in world.stream.updates for p in u.removed)


def assert_watch_only(sidecar: SidecarProcess) -> None:
    status, body = sidecar.http_get("/readyz")
    assert status == 200 and "watch-only" in body and "dynamo-worker" in body, (status, body)
    with DiscoveryClient(sidecar.target, republish=False) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.publish_metadata({"custom": 1})
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "managed by 'dynamo-worker'" in (refused.value.details() or "")
        peers = client.list_peers(make_filter(endpoint=ENDPOINT)).peers
        assert FRONTEND not in [p.name for p in peers], "it still serves peers (the frontend is the observer's own)"


def test_sidecar_next_to_dynamo_goes_watch_only_and_both_survive_a_sidecar_restart(world: World) -> None:
    """Dynamo's runtime is the main container and registers the pod itself: its sidecar writes nothing (no
    apply over Dynamo's data, no delete at SIGTERM), says so, serves peers, and a restart of it changes nothing
    for Dynamo's readers or the sidecar's."""
    pod, worker = start_dynamo_worker(world, "worker-0")
    instance_id = worker.instance_id
    world.wait_dynamo(lambda ids: instance_id in ids, "contains worker-0")
    before = world.cr("worker-0")
    assert before is not None and managers(before) == {"dynamo-worker"}

    sidecar = world.sidecar(pod)
    assert_watch_only(sidecar)
    with DiscoveryClient(sidecar.target) as client:
        me = client.get_self()
        assert me.registered and json.loads(me.data_json) == before["spec"]["data"], "GetSelf shows Dynamo's CR"
    assert any(e.get("event", "").startswith("another writer manages this pod's CR") for e in sidecar.log_events())

    world.wait_stream(lambda r: "worker-0" in r.names(), "worker-0 a peer")
    assert sidecar.terminate() == 0
    after_stop = world.cr("worker-0")
    assert after_stop is not None, "the sidecar's SIGTERM left Dynamo's CR in place"
    sidecar.start().wait_ready()
    assert_watch_only(sidecar)

    current = world.cr("worker-0")
    assert current is not None
    assert current["metadata"]["uid"] == before["metadata"]["uid"], "never deleted and re-created"
    assert current["spec"]["data"] == before["spec"]["data"] and managers(current) == {"dynamo-worker"}
    world.wait_dynamo(lambda ids: instance_id in ids, "still contains worker-0 after the sidecar restart")
    assert world.peer("worker-0") is not None and never_removed(world, "worker-0")


def test_dynamo_starting_after_its_sidecar_makes_the_sidecar_yield(world: World) -> None:
    """The other order: the sidecar registered the pod first, then Dynamo's runtime applied its CR (1.6.1
    applies with force, whoever wrote before). The sidecar sees the new writer in the watch and stops writing."""
    pod = world.pod("worker-0")
    # Seen at once through the CR watch; with DISCOVERY_WATCH=auto and no peer request, at the next resync.
    sidecar = world.sidecar(pod, {"DISCOVERY_WATCH": "always"})
    wait_for(lambda: world.cr("worker-0"), TIMEOUT, what="the sidecar's CR")
    worker = world.dynamo.worker(pod, endpoint=ENDPOINT, model=None)
    worker.wait_event("serving")
    instance_id = worker.instance_id
    world.wait_dynamo(lambda ids: instance_id in ids, "contains worker-0")
    wait_for(lambda: "watch-only" in sidecar.http_get("/readyz")[1], TIMEOUT, what="the sidecar to go watch-only")
    assert_watch_only(sidecar)

    assert sidecar.terminate() == 0
    cr = world.cr("worker-0")
    assert cr is not None and endpoint_key(ENDPOINT, instance_id) in cr["spec"]["data"]["endpoints"], (
        "the yielded sidecar deletes nothing at SIGTERM"
    )
    world.wait_dynamo(lambda ids: instance_id in ids, "still contains worker-0")


# -- what the publisher is told is what peers read (issue 19, item 4) ------------------------------------------------
def test_get_self_the_publish_reply_peers_and_dynamo_agree_when_objects_are_emptied(world: World) -> None:
    """Server-side apply stores an object the sidecar emptied as null (a model card's ``card_json``, at any
    depth). The sidecar makes the stored form what it was told, so GetSelf, the PublishMetadata reply, the CR
    and a sidecar peer agree on each document, and Dynamo's client reads it: each publish also moves the
    endpoint, and Dynamo shows the new address. A transport emptied (Dynamo cannot decode ``{}``, nor the
    null it would be stored as) is refused with INVALID_ARGUMENT naming the field; Dynamo keeps the pod."""
    pod = world.pod("sc-worker-0")
    sidecar = world.sidecar(pod)
    ip = pod["status"]["podIP"]
    with DiscoveryClient(sidecar.target) as client:
        instance_id = client.get_self().instance_id
        key = endpoint_key(ENDPOINT, instance_id)
        card = {"type": "Model", "namespace": "demo", "component": "backend", "endpoint": "generate",
                "instance_id": instance_id, "card_json": {"display_name": MODEL, "runtime": {"ctx": 8192}}}
        first = dynamo_metadata(ENDPOINT, instance_id, f"{ip}:8000") | {"model_cards": {key: card}}
        steps = [
            (first, False),
            ({"model_cards": {key: {"card_json": {"runtime": {"ctx": None}}}}}, True),  # runtime emptied
            ({"model_cards": {key: {"card_json": {"display_name": None, "runtime": None}}}}, True),  # card_json {}
            ({"model_cards": {key: None}}, True),  # model_cards {}
        ]
        for port, (document, merge) in enumerate(steps, start=8001):
            moved = endpoint_entry(ENDPOINT, instance_id, f"{ip}:{port}")
            document = json.loads(json.dumps(document))
            if merge:
                document["endpoints"] = {key: {"transport": moved["transport"]}}
            else:
                document["endpoints"][key] = moved
            reply = json.loads(client.publish_metadata(document, merge=merge).data_json)
            stored = world.cr("sc-worker-0")
            assert stored is not None
            assert reply == json.loads(client.get_self().data_json) == stored["spec"]["data"], document
            world.wait_stream(
                lambda r, want=reply: peer_data(r.peers().get("sc-worker-0")) == want,
                f"the observer to read {reply}",
            )
            wait_for(
                lambda want=moved["transport"]["tcp"]: (world.dynamo_instance(instance_id) or {})
                .get("transport", {})
                .get("address")
                == want,
                TIMEOUT,
                what=f"Dynamo's client to read the revision moving the endpoint to port {port}",
            )
        assert reply["model_cards"] == {}
        with pytest.raises(grpc.RpcError) as refused:
            client.publish_metadata({"endpoints": {key: {"transport": {"tcp": None}}}}, merge=True)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"spec.data.endpoints[{key!r}].transport" in (refused.value.details() or "")
        assert world.cr("sc-worker-0")["spec"]["data"] == reply, "nothing written"
    world.wait_dynamo(lambda ids: instance_id in ids, "still lists the pod")
