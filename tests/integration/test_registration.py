"""Self-registration against the real control plane, with real pod-bound service-account tokens."""

from __future__ import annotations

import json
import re

import pytest

from devcluster.cluster import ControlPlane
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.sidecars import SidecarProcess, write_token_kubeconfig
from devcluster.waiting import wait_for
from discovery_client.client import DiscoveryClient
from sidecar.kube.api import ApiError, KubeApi
from sidecar.kube.publisher import KubePublisher
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import PodIdentity
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

METADATA = {
    # An Endpoint entry as Dynamo's runtime writes it (and as the sidecar requires of its own metadata).
    "endpoints": {
        "dynamo/backend/generate/10dbf5fbb4b0ff": {
            "type": "Endpoint",
            "namespace": "dynamo",
            "component": "backend",
            "endpoint": "generate",
            "instance_id": 0x10DBF5FBB4B0FF,
            "transport": {"nats_tcp": "dynamo.backend.generate"},
        }
    },
    "model_cards": {},
    "event_channels": {},
    # 2**53 + 1: not representable as a double, so any float conversion on the way would show.
    # (Integers beyond int64 are turned into doubles by the API server itself.)
    "opaque": {"big": 9007199254740993, "list": [1, "two", None]},
}


def cr(cluster: Cluster, namespace: str, name: str) -> dict | None:
    return cluster.get_or_none(WORKER_METADATA.item(namespace, name))


def test_registers_cr_owned_by_the_pod(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    pod = cluster.start_pod(namespace, "worker-0", {"app": "w", "role": "prefill"})
    sidecars.start(pod, "w", metadata=METADATA).wait_ready()
    obj = cr(cluster, namespace, "worker-0")
    assert obj is not None
    meta = obj["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "worker-0",
            "uid": pod["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": False,
        }
    ]
    assert obj["spec"]["data"] == METADATA, "spec.data must round-trip exactly, big integers included"
    # The pod's labels as the API server has them (1.36 also copies the node's zone label onto pods).
    assert meta["labels"] == pod["metadata"]["labels"]
    assert {"app": "w", "role": "prefill"}.items() <= meta["labels"].items()
    managers = {(m["manager"], m["operation"]) for m in meta["managedFields"]}
    assert ("discovery-sidecar", "Apply") in managers, "registration uses server-side apply"


def test_cr_is_garbage_collected_when_the_pod_goes(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    pod = cluster.start_pod(namespace, "worker-gc", {"app": "w"})
    process = sidecars.start(pod, "w").wait_ready()
    process.kill()  # no deregistration: only garbage collection can remove it now
    assert cr(cluster, namespace, "worker-gc") is not None
    cluster.delete_pod(namespace, "worker-gc", grace_seconds=0)
    wait_for(lambda: cr(cluster, namespace, "worker-gc") is None, 60, what="GC of the CR")


def test_stale_incarnation_cr_is_replaced_not_adopted(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    # A leftover CR under this pod's name whose owner is not this pod (an owner that still exists, so the
    # garbage collector leaves it alone): exactly what fencing is for.
    holder = cluster.api.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "old-owner"}},
    )
    stale = cluster.api.create(
        WORKER_METADATA.collection(namespace),
        {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoWorkerMetadata",
            "metadata": {
                "name": "worker-1",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "old-owner", "uid": holder["metadata"]["uid"]}
                ],
            },
            "spec": {"data": {"stale": True}},
        },
    )
    pod = cluster.start_pod(namespace, "worker-1", {"app": "w"})
    process = sidecars.start(pod, "w", metadata={"fresh": True}).wait_ready()
    fresh = cr(cluster, namespace, "worker-1")
    assert fresh is not None
    assert fresh["metadata"]["uid"] != stale["metadata"]["uid"], "the stale object must be replaced, not adopted"
    assert fresh["spec"]["data"] == {"fresh": True}
    assert [r["uid"] for r in fresh["metadata"]["ownerReferences"]] == [pod["metadata"]["uid"]]
    assert any(e.get("event") == "replacing a CR left by another pod incarnation" for e in process.log_events())


def test_same_name_new_uid_gets_its_own_cr(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    old_pod = cluster.start_pod(namespace, "worker-2", {"app": "w"})
    old = sidecars.start(old_pod, "w", metadata={"incarnation": 1}).wait_ready()
    old.kill()
    old_cr = cr(cluster, namespace, "worker-2")
    assert old_cr is not None
    cluster.delete_pod(namespace, "worker-2", grace_seconds=0)
    new_pod = cluster.start_pod(namespace, "worker-2", {"app": "w"})
    assert new_pod["metadata"]["uid"] != old_pod["metadata"]["uid"]
    sidecars.start(new_pod, "w", metadata={"incarnation": 2}).wait_ready()
    current = cr(cluster, namespace, "worker-2")
    assert current is not None
    assert current["metadata"]["uid"] != old_cr["metadata"]["uid"]
    assert current["metadata"]["ownerReferences"][0]["uid"] == new_pod["metadata"]["uid"]
    assert current["spec"]["data"] == {"incarnation": 2}


def test_fencing_precondition_never_deletes_a_fresh_cr(namespace: str, cluster: Cluster, admin_api: KubeApi) -> None:
    """The race: fencing reads a stale CR, then the CR is replaced by a fresh one before the delete lands."""
    pod = cluster.start_pod(namespace, "worker-3", {"app": "w"})
    identity = PodIdentity("worker-3", namespace, pod["metadata"]["uid"])
    path = WORKER_METADATA.item(namespace, "worker-3")

    def body(owner_kind: str, owner_name: str, owner_uid: str, data: dict) -> dict:
        return {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoWorkerMetadata",
            "metadata": {
                "name": "worker-3",
                "ownerReferences": [{"apiVersion": "v1", "kind": owner_kind, "name": owner_name, "uid": owner_uid}],
            },
            "spec": {"data": data},
        }

    # The stale CR's owner must exist, or the garbage collector may delete it before fencing looks.
    holder = admin_api.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "h"}},
    )
    admin_api.create(
        WORKER_METADATA.collection(namespace), body("ConfigMap", "h", holder["metadata"]["uid"], {"stale": 1})
    )

    class RacingApi(KubeApi):
        """Lets the real GET through, then swaps the object before the registrar can act on it."""

        swapped = False

        def get(self, p: str, query=()):  # type: ignore[override]
            seen = super().get(p, query)
            if p == path and not self.swapped:
                self.swapped = True
                admin_api.delete(path)
                fresh_body = body("Pod", "worker-3", pod["metadata"]["uid"], {"fresh": 1})
                admin_api.create(WORKER_METADATA.collection(namespace), fresh_body)
            return seen

    racing = RacingApi(admin_api.api_client)
    registrar = KubePublisher(racing, identity, {}, {"fresh": 1}, "discovery-sidecar", Metrics())
    registrar.fence()
    assert racing.swapped, "fencing must have read the stale CR"
    fresh = admin_api.get(path)
    fresh_uid = fresh["metadata"]["uid"]
    assert fresh["spec"]["data"] == {"fresh": 1}, "the fresh CR survived the fencing delete (UID precondition)"
    registrar.fence()  # reads the fresh CR, sees it is ours, leaves it
    assert admin_api.get(path)["metadata"]["uid"] == fresh_uid


def test_recreated_after_external_delete(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    pod = cluster.start_pod(namespace, "worker-4", {"app": "w"})
    # The CR watch (started at once here, not on the first peer request) shows the delete at once.
    sidecars.start(pod, "w", metadata={"k": "v"}, extra_env={"DISCOVERY_WATCH": "always"}).wait_ready()
    first = cr(cluster, namespace, "worker-4")
    assert first is not None
    cluster.api.delete(WORKER_METADATA.item(namespace, "worker-4"))
    again = wait_for(
        lambda: (lambda o: o if o and o["metadata"]["uid"] != first["metadata"]["uid"] else None)(
            cr(cluster, namespace, "worker-4")
        ),
        30,
        what="the sidecar to re-create its CR",
    )
    assert again["spec"]["data"] == {"k": "v"}
    assert again["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]


def test_published_metadata_reaches_a_peer(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    pod_a = cluster.start_pod(namespace, "worker-a", {"app": "w"})
    pod_b = cluster.start_pod(namespace, "worker-b", {"app": "w"})
    a = sidecars.start(pod_a, "w", metadata={"endpoints": {}, "model_cards": {}}).wait_ready()
    b = sidecars.start(pod_b, "w").wait_ready()
    watcher = StreamRecorder(b.target)
    try:
        watcher.wait_names({"worker-a"})
        from discovery_client.client import DiscoveryClient

        with DiscoveryClient(a.target) as client:
            own = client.get_self().instance_id
            card = {  # Dynamo's entry shape (PublishMetadata refuses others in Dynamo's four maps)
                "type": "Model",
                "namespace": "dyn",
                "component": "backend",
                "endpoint": "generate",
                "instance_id": own,
                "card_json": {"display_name": "llama", "ctx": 8192},
            }
            cards = {f"dyn/backend/generate/{own:x}": card}
            reply = client.publish_metadata({"model_cards": cards}, merge=True)
            assert json.loads(reply.data_json) == {"endpoints": {}, "model_cards": cards}
            me = client.get_self()
            assert me.registered and me.uid == pod_a["metadata"]["uid"]
            assert json.loads(me.data_json)["model_cards"] == cards
        watcher.wait_until(
            lambda r: json.loads(r.peers()["worker-a"].data_json).get("model_cards") == cards,
            what="the peer to see the published model card",
        )
        stored = cr(cluster, namespace, "worker-a")
        assert stored is not None and stored["spec"]["data"]["model_cards"] == cards
    finally:
        watcher.close()


def test_sigterm_deregisters_before_exit(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    pod_a = cluster.start_pod(namespace, "worker-x", {"app": "w"})
    pod_b = cluster.start_pod(namespace, "worker-y", {"app": "w"})
    a = sidecars.start(pod_a, "w").wait_ready()
    b = sidecars.start(pod_b, "w").wait_ready()
    watcher = StreamRecorder(b.target)
    try:
        watcher.wait_names({"worker-x"})
        assert a.terminate(timeout=20) == 0
        # The process has exited; by then its CR must already be gone (not merely about to be).
        assert cr(cluster, namespace, "worker-x") is None
        watcher.wait_names(set())
        events = [e.get("event") for e in a.log_events()]
        assert "deregistered" in events and events.index("deregistered") < events.index("stopped")
    finally:
        watcher.close()


# -- runtime metadata survives a restart of the sidecar --------------------------------------------------------
PUBLISHED = {**METADATA, "custom": {"warm": True, "generation": 2}}


def test_a_graceful_sidecar_restart_gets_the_published_metadata_back_from_the_client(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    """SIGTERM deletes the CR; the next sidecar process starts from DISCOVERY_METADATA. The main container's
    client notices its sidecar came back and publishes its last metadata again: not rolled back."""
    from discovery_client.client import DiscoveryClient

    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w", metadata=METADATA).wait_ready()
    with DiscoveryClient(sidecar.target) as client:  # the main container's client, left open throughout
        client.publish_metadata(PUBLISHED)
        assert sidecar.terminate() == 0
        assert cr(cluster, namespace, "worker-0") is None, "deregistered at SIGTERM"
        sidecar.start()
        stored = wait_for(
            lambda: (obj := cr(cluster, namespace, "worker-0")) and obj["spec"]["data"] == PUBLISHED and obj,
            30,
            what="the restarted sidecar's CR to hold the published metadata again",
        )
        assert stored["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
        assert json.loads(client.get_self().data_json) == PUBLISHED


def test_a_crashed_sidecar_restarts_with_the_published_metadata_kept(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    """SIGKILL (a crash, an OOM kill) leaves the CR of this incarnation with what was published since start-up;
    the next process keeps that rather than re-applying DISCOVERY_METADATA, even without a client's help."""
    from discovery_client.client import DiscoveryClient

    pod = cluster.start_pod(namespace, "worker-0", {"app": "w"})
    sidecar = sidecars.start(pod, "w", metadata=METADATA).wait_ready()
    with DiscoveryClient(sidecar.target, republish=False) as client:
        client.publish_metadata(PUBLISHED)
    before = cr(cluster, namespace, "worker-0")
    assert before is not None
    sidecar.kill()
    sidecar.start().wait_ready()
    after = cr(cluster, namespace, "worker-0")
    assert after is not None and after["spec"]["data"] == PUBLISHED
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert any(e.get("event", "").startswith("kept the metadata this pod published") for e in sidecar.log_events())
    with DiscoveryClient(sidecar.target, republish=False) as client:
        assert json.loads(client.get_self().data_json) == PUBLISHED


# -- RBAC: the Role suffices, and nothing less does -------------------------------------------------------
FULL_RULES = {
    ("nvidia.com", "dynamoworkermetadatas"): ["get", "list", "watch", "create", "patch", "delete"],
    ("discovery.k8s.io", "endpointslices"): ["list", "watch"],
    ("", "pods"): ["get"],
}
DROPS = [(res, verb) for (_, res), verbs in FULL_RULES.items() for verb in verbs]


def make_limited_role(cluster: Cluster, namespace: str, drop: tuple[str, str] | None) -> None:
    rules = [
        {"apiGroups": [group], "resources": [res], "verbs": [v for v in verbs if (res, v) != drop]}
        for (group, res), verbs in FULL_RULES.items()
    ]
    rules = [rule for rule in rules if rule["verbs"]]  # a rule left with no verb is not a valid rule
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    cluster.api.create(
        f"{rbac}/roles",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "limited"}, "rules": rules},
    )
    cluster.create_service_account(namespace, "limited")
    cluster.bind_role(namespace, "limited", "limited")


def test_role_in_manifests_matches_the_verbs_tested_here() -> None:
    import yaml

    from tests.conftest import MANIFESTS

    docs = [d for d in yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text()) if d and d["kind"] == "Role"]
    rules = {(r["apiGroups"][0], r["resources"][0]): sorted(r["verbs"]) for r in docs[0]["rules"]}
    assert rules == {k: sorted(v) for k, v in FULL_RULES.items()}


@pytest.mark.parametrize("drop", [None, *DROPS], ids=lambda d: "full-role" if d is None else f"without-{d[1]}-{d[0]}")
def test_each_role_verb_is_needed(
    drop: tuple[str, str] | None, namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    cluster.create_service(namespace, "w", {"app": "w"})
    make_limited_role(cluster, namespace, drop)
    if drop == ("pods", "get"):
        # The Pod is read only on an ownership conflict, so make one: a CR of this pod's name owned by
        # someone else (an owner that exists, so that the garbage collector leaves it alone).
        holder = cluster.api.create(
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "old-owner"}},
        )
        stale = cluster.api.create(
            WORKER_METADATA.collection(namespace),
            {
                "apiVersion": "nvidia.com/v1alpha1",
                "kind": "DynamoWorkerMetadata",
                "metadata": {
                    "name": "worker-r",
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "ConfigMap", "name": "old-owner", "uid": holder["metadata"]["uid"]}
                    ],
                },
                "spec": {"data": {"stale": True}},
            },
        )
    pod = cluster.start_pod(namespace, "worker-r", {"app": "w"}, service_account="limited")
    # Watches from start-up, so that their verbs are exercised without a client. ``list`` is needed by the
    # paginated LIST only: a streaming list (the default) is a watch, so it is tested with pages, the
    # fallback for API servers that refuse streaming lists.
    env = {"DISCOVERY_WATCH": "always"}
    if drop is not None and drop[1] == "list":
        env["DISCOVERY_INITIAL_LIST"] = "pages"
    process = sidecars.start(pod, "w", service_account="limited", extra_env=env)

    def readyz() -> str:
        return process.http_get("/readyz")[1]

    if drop == ("pods", "get"):
        # What breaks: the sidecar cannot tell whether its pod incarnation still exists, so a sidecar whose
        # pod was force-deleted and replaced could not stop writing (tests/integration/test_hostile_owners.py).
        # It says so once and fences as before: registration itself still works.
        process.wait_ready()
        fresh = cr(cluster, namespace, "worker-r")
        assert fresh is not None and fresh["metadata"]["uid"] != stale["metadata"]["uid"]
        hints = [
            e for e in process.log_events() if e.get("event") == "cannot tell whether this pod incarnation still exists"
        ]
        assert len(hints) == 1
        assert "grant get on pods (manifests/rbac.yaml)" in hints[0]["hint"]
        return

    if drop is None or drop == ("dynamoworkermetadatas", "delete"):
        process.wait_ready()
        assert process.terminate(timeout=20) == 0
        remains = cr(cluster, namespace, "worker-r") is not None
        assert remains == (drop is not None), "without delete, deregistration fails and the CR stays"
        if drop is not None:
            assert "deregistration failed" in [e.get("event") for e in process.log_events()]
        return
    resource, verb = drop
    expected = {
        "get": "forbidden to register",
        "create": "forbidden to register",
        "patch": "forbidden to register",
        "list": "watches not synced",
        "watch": f"{resource}: API error 403",
    }[verb]
    wait_for(lambda: expected in readyz(), 30, what=f"/readyz to report {expected!r}")
    status, _ = process.http_get("/readyz")
    assert status == 503


# -- the admission policy ----------------------------------------------------------------------------------
def test_admission_policy_limits_a_pod_to_its_own_cr(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, tmp_path
) -> None:
    mine = cluster.start_pod(namespace, "own-pod", {"app": "w"})
    cluster.start_pod(namespace, "other-pod", {"app": "w"})
    token = cluster.pod_bound_token(namespace, "discovery-sidecar", mine)
    api = KubeApi.from_kubeconfig(str(write_token_kubeconfig(control_plane, token, tmp_path / "own.kubeconfig")))

    def body(name: str, owner: dict | None = None) -> dict:
        metadata: dict = {"name": name}
        if owner is not None:  # the policy admits a pod's CR only when owned by that pod incarnation alone
            ref = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
            metadata["ownerReferences"] = [ref]
        return {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoWorkerMetadata",
            "metadata": metadata,
            "spec": {"data": {}},
        }

    created = api.apply(WORKER_METADATA.item(namespace, "own-pod"), body("own-pod", mine), "discovery-sidecar")
    assert created["metadata"]["name"] == "own-pod"

    with pytest.raises(ApiError) as create_other:
        api.apply(WORKER_METADATA.item(namespace, "other-pod"), body("other-pod"), "discovery-sidecar")
    assert create_other.value.status == 403
    assert "pod own-pod tried other-pod" in create_other.value.message

    cluster.api.create(WORKER_METADATA.collection(namespace), body("other-pod"))  # as an admin: allowed
    with pytest.raises(ApiError) as update_other:
        api.merge_patch(WORKER_METADATA.item(namespace, "other-pod"), {"spec": {"data": {"hijack": True}}})
    assert update_other.value.status == 403
    with pytest.raises(ApiError) as delete_other:
        api.delete(WORKER_METADATA.item(namespace, "other-pod"))
    assert delete_other.value.status == 403
    assert cr(cluster, namespace, "other-pod")["spec"]["data"] == {}  # type: ignore[index]

    # A token of the same service account that is not bound to a pod cannot write at all.
    unbound = cluster.api.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/discovery-sidecar/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 600},
        },
    )["status"]["token"]
    plain = KubeApi.from_kubeconfig(str(write_token_kubeconfig(control_plane, unbound, tmp_path / "plain.kubeconfig")))
    with pytest.raises(ApiError) as no_pod:
        plain.apply(WORKER_METADATA.item(namespace, "own-pod"), body("own-pod", mine), "discovery-sidecar")
    assert no_pod.value.status == 403 and "without a pod-bound token" in no_pod.value.message
    api.delete(WORKER_METADATA.item(namespace, "own-pod"))  # its own: allowed
    assert cr(cluster, namespace, "own-pod") is None
    api.close()
    plain.close()


# -- the registration is watched, always, and restored at once (issue 19) ---------------------------------------
FOREVER = {"DISCOVERY_REGISTRATION_RESYNC": "1h"}  # so that only the watch of its own CR can restore it


def metric(process: SidecarProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` on the sidecar's /metrics."""
    _, text = process.http_get("/metrics")
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if labels.items() <= found.items():
            total += float(match.group(2))
    return total


def events(process: SidecarProcess, name: str, after: int = 0) -> list[dict]:
    return [e for e in process.log_events()[after:] if e.get("event") == name]


def other_uid(cluster: Cluster, namespace: str, name: str, uid: str) -> dict | None:
    """The CR of ``name`` when it is another object than ``uid`` (re-created), else None."""
    obj = cr(cluster, namespace, name)
    return obj if obj is not None and obj["metadata"]["uid"] != uid else None


def test_a_cr_deleted_from_under_an_idle_auto_sidecar_is_back_at_once(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    """DISCOVERY_WATCH=auto, nobody asked for peers, no resync for an hour: the watch of its own CR (by field
    selector, the only watch it holds) sees the delete, and the CR is back at once; the log says it was lost
    (a warning) and restored (an info line with how long), and so do the metrics."""
    pod = cluster.start_pod(namespace, "worker-5", {"app": "w"})
    process = sidecars.start(pod, "w", metadata={"k": "v"}, extra_env=FOREVER).wait_ready()
    wait_for(lambda: events(process, "listed"), 30, what="the watch of its own CR")
    first = cr(cluster, namespace, "worker-5")
    assert first is not None

    cluster.api.delete(WORKER_METADATA.item(namespace, "worker-5"))
    again = wait_for(lambda: other_uid(cluster, namespace, "worker-5", first["metadata"]["uid"]), 10, what="re-created")
    assert again["spec"]["data"] == {"k": "v"}
    assert [r["uid"] for r in again["metadata"]["ownerReferences"]] == [pod["metadata"]["uid"]]
    wait_for(lambda: events(process, "registration restored"), 10, what="the log to say it is restored")
    (lost,) = events(process, "registration lost; restoring it")
    assert lost["level"] == "warning" and lost["reason"] == "deleted"
    (restored,) = events(process, "registration restored")
    assert restored["level"] == "info" and restored["reason"] == "deleted" and restored["seconds"] < 10
    assert metric(process, "discovery_registration_lost_total", reason="deleted") == 1
    assert metric(process, "discovery_registration_restored_total", reason="deleted") == 1
    assert metric(process, "discovery_registration_restore_seconds_count") == 1
    assert process.http_get("/readyz") == (200, "ok\n")
    assert [e["source"] for e in events(process, "listed")] == ["registration"], "no peer watch was started"


def test_an_altered_cr_is_restored_as_published(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    """Someone else changes the CR's data, adds a key and drops a label: restored at once, the key removed."""
    pod = cluster.start_pod(namespace, "worker-6", {"app": "w", "role": "decode"})
    process = sidecars.start(pod, "w", metadata=METADATA, extra_env=FOREVER).wait_ready()
    wait_for(lambda: events(process, "listed"), 30, what="the watch of its own CR")
    path = WORKER_METADATA.item(namespace, "worker-6")
    cluster.api.merge_patch(
        path,
        {"metadata": {"labels": {"role": None}}, "spec": {"data": {"opaque": {"big": 1}, "foreign": {"x": 1}}}},
    )
    restored = wait_for(
        lambda: (obj := cr(cluster, namespace, "worker-6")) and obj["spec"]["data"] == METADATA and obj,
        10,
        what="the published data back, the foreign key gone",
    )
    assert restored["metadata"]["labels"]["role"] == "decode"
    wait_for(lambda: events(process, "registration restored"), 10, what="the log to say it is restored")
    assert [e["reason"] for e in events(process, "registration lost; restoring it")] == ["altered"]
    with DiscoveryClient(process.target) as client:
        assert json.loads(client.get_self().data_json) == METADATA


def test_a_finalizer_held_cr_of_the_previous_incarnation_is_waited_out_never_written(
    namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    """The previous pod's CR is held by a finalizer (it has a deletionTimestamp) longer than the re-apply
    interval. The new pod's sidecar never writes onto it (applying would make its data and its owner vanish
    with it): /readyz is 503 naming the object and the finalizer, its stream says DEGRADED for the
    registration. Once the finalizer is lifted and the old CR gone, the new CR is created at once and the
    pod is a peer again."""
    cluster.create_service(namespace, "w", {"app": "w"})
    router = sidecars.start(
        cluster.start_pod(namespace, "router", {"app": "w"}), "w", extra_env={"DISCOVERY_WATCH": "always"}
    ).wait_ready()
    seen = StreamRecorder(router.target)
    old_pod = cluster.start_pod(namespace, "worker-7", {"app": "w"})
    old = sidecars.start(old_pod, "w", metadata={"incarnation": 1}).wait_ready()
    path = WORKER_METADATA.item(namespace, "worker-7")
    try:
        seen.wait_names({"worker-7"})
        cluster.api.merge_patch(path, {"metadata": {"finalizers": ["example.com/hold"]}})
        old.kill()  # a crash: the CR stays
        old_cr = cr(cluster, namespace, "worker-7")
        assert old_cr is not None
        # The pod replaced under the same name: the new pod's fencing delete (or the garbage collector, whichever
        # comes first) only marks the old CR, which its finalizer holds.
        cluster.delete_pod(namespace, "worker-7", grace_seconds=0)
        new_pod = cluster.start_pod(namespace, "worker-7", {"app": "w"})
        skip = len(old.log_events())  # both processes log to the pod's file
        new = sidecars.start(
            new_pod, "w", metadata={"incarnation": 2}, extra_env={"DISCOVERY_REGISTRATION_RESYNC": "1s"}
        )

        def blocked() -> str:
            status, body = new.http_get("/readyz")
            return body if status == 503 and "example.com/hold" in body else ""

        body = wait_for(blocked, 30, what="/readyz to name the finalizer")
        held = cr(cluster, namespace, "worker-7")
        assert held is not None and held["metadata"]["uid"] == old_cr["metadata"]["uid"]
        assert held["metadata"].get("deletionTimestamp"), "terminating, held by its finalizer"
        assert f"DynamoWorkerMetadata {namespace}/worker-7 (uid {held['metadata']['uid']}" in body
        own = StreamRecorder(new.target)
        own.wait_until(lambda r: not r.updates[-1].connected, 30, "the new pod's stream DEGRADED")
        debug = json.loads(new.http_get("/debug/peers")[1])  # the same status, with its reason
        assert debug["api_status"] == "degraded" and debug["api_status_reason"].startswith("registration: waiting")
        # Held for longer than the re-apply interval (1s): several looks, no write.
        gets = metric(new, "discovery_api_requests_total", verb="get")
        wait_for(lambda: metric(new, "discovery_api_requests_total", verb="get") >= gets + 3, 30, what="3 more looks")
        assert metric(new, "discovery_api_requests_total", verb="patch") == 0, "nothing written onto it"
        still = cr(cluster, namespace, "worker-7")
        assert still is not None and still["metadata"]["uid"] == held["metadata"]["uid"]
        assert [r["uid"] for r in still["metadata"]["ownerReferences"]] == [old_pod["metadata"]["uid"]]
        assert still["spec"]["data"] == {"incarnation": 1}
        assert new.http_get("/readyz")[0] == 503
        assert metric(new, "discovery_registration_blocked") == 1

        cluster.api.merge_patch(path, {"metadata": {"finalizers": None}})
        fresh = wait_for(
            lambda: other_uid(cluster, namespace, "worker-7", held["metadata"]["uid"]), 10, what="the new CR"
        )
        assert [r["uid"] for r in fresh["metadata"]["ownerReferences"]] == [new_pod["metadata"]["uid"]]
        assert fresh["spec"]["data"] == {"incarnation": 2}
        new.wait_ready(10)
        own.wait_until(lambda r: r.updates[-1].connected, 30, "the new pod's stream CONNECTED again")
        seen.wait_until(
            lambda r: (p := r.peers().get("worker-7")) is not None and p.uid == new_pod["metadata"]["uid"],
            30,
            "the new pod a peer again",
        )
        (waiting,) = events(new, "registration waiting", skip)
        assert waiting["level"] == "warning" and "example.com/hold" in waiting["reason"]
        assert metric(new, "discovery_registration_blocked") == 0
        own.close()
    finally:
        seen.close()
        if cr(cluster, namespace, "worker-7") is not None:
            cluster.api.merge_patch(path, {"metadata": {"finalizers": None}})


def test_get_self_the_publish_reply_and_peers_agree(namespace: str, cluster: Cluster, sidecars: Sidecars) -> None:
    """Server-side apply stores an object this pod emptied as null: the sidecar applies once more so that it
    is stored as sent, and GetSelf, the PublishMetadata reply and a peer read the same document, each time."""
    cluster.create_service(namespace, "w", {"app": "w"})
    pod = cluster.start_pod(namespace, "worker-8", {"app": "w"})
    worker = sidecars.start(pod, "w").wait_ready()
    observer = sidecars.start(cluster.start_pod(namespace, "obs", {"app": "w"}), "w").wait_ready()
    seen = StreamRecorder(observer.target)
    try:
        with DiscoveryClient(worker.target) as client:
            own = client.get_self().instance_id
            key = f"dyn/backend/generate/{own:x}"
            card = {"type": "Model", "namespace": "dyn", "component": "backend", "endpoint": "generate",
                    "instance_id": own, "card_json": {"display_name": "m", "nested": {"a": 1}}}
            steps: list[tuple[dict, bool]] = [
                ({"endpoints": {}, "model_cards": {key: card}, "custom": {"x": {"y": 1}}}, False),
                ({"model_cards": {key: {"card_json": {"display_name": None, "nested": {"a": None}}}}}, True),
                ({"custom": {"x": {"y": None}}}, True),
                ({"endpoints": {}, "model_cards": {}, "custom": {}}, False),
            ]
            for document, merge in steps:
                reply = json.loads(client.publish_metadata(document, merge=merge).data_json)
                stored = cr(cluster, namespace, "worker-8")
                assert stored is not None
                assert reply == json.loads(client.get_self().data_json) == stored["spec"]["data"], document
                seen.wait_until(
                    lambda r, want=reply: json.loads(r.peers()["worker-8"].data_json) == want
                    if "worker-8" in r.peers() else False,
                    30,
                    f"the peer to read {reply}",
                )
            assert reply == {"endpoints": {}, "model_cards": {}, "custom": {}}
    finally:
        seen.close()


def test_an_api_server_outage_logs_one_warning_and_one_info_per_component(
    namespace: str, cluster: Cluster, sidecars: Sidecars, control_plane: ControlPlane
) -> None:
    """A transient outage is one warning when it starts and one info line when it ends, per component (each
    watch, the registration, the streams); nothing at error level; readiness stays 200 (the CR still stands,
    and a blip of the control plane must not take every pod out of its Service)."""
    from devcluster.faults import FaultProxy

    cluster.create_service(namespace, "w", {"app": "w"})
    proxy = FaultProxy(control_plane.apiserver_port)
    try:
        pod = cluster.start_pod(namespace, "worker-9", {"app": "w"})
        env = {"DISCOVERY_WATCH": "always", "DISCOVERY_REGISTRATION_RESYNC": "1s", "DISCOVERY_BACKOFF_MAX": "1s"}
        process = sidecars.start(pod, "w", extra_env=env, server=proxy.server).wait_ready()
        proxy.refuse()
        wait_for(lambda: metric(process, "discovery_api_connected") == 0, 30, what="the outage noticed")
        failures = 'discovery_api_errors_total'
        wait_for(lambda: metric(process, failures, operation="register") >= 3, 30, what="3 failed registrations")
        wait_for(lambda: metric(process, failures, operation="watch-registration") >= 3, 30, what="3 failed watches")
        assert process.http_get("/readyz")[0] == 200, "ready all along: registered, and synced before"
        proxy.accept()
        wait_for(lambda: metric(process, "discovery_api_connected") == 1, 30, what="the outage over")
        wait_for(lambda: events(process, "registration works again"), 30, what="the registration back")
        wait_for(lambda: len(events(process, "API server reachable again")) == 3, 30, what="each watch back")
    finally:
        proxy.close()
    logged = process.log_events()
    assert not [e for e in logged if e.get("level") == "error"], "a transient outage needs no human"
    for source in ("registration", "endpointslices", "dynamoworkermetadatas"):
        failed = [e for e in logged if e.get("event") == "watch failed, retrying" and e.get("source") == source]
        assert [e["level"] for e in failed if e["level"] != "debug"] == ["warning"], source
        back = [e for e in logged if e.get("event") == "API server reachable again" and e.get("source") == source]
        assert len(back) == 1 and back[0]["level"] == "info" and back[0]["failed_attempts"] >= 1, source
    assert [e["level"] for e in events(process, "registration failing; retrying")] == ["warning"]
    (again,) = events(process, "registration works again")
    assert again["level"] == "info" and again["failed_attempts"] >= 3
    assert [e["level"] for e in events(process, "streams DEGRADED")] == ["warning"]
    assert [e["level"] for e in events(process, "streams CONNECTED: peer set is current")] == ["info"]
