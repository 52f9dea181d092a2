"""Owners that are not who they say, on the real control plane.

* A replaced pod incarnation: pod ``t-0`` (UID U1) is force-deleted while its sidecar still runs and is
  recreated (UID U2) with a sidecar of its own. The old sidecar must stop writing at once (superseded)
  instead of deleting and re-applying the CR against the new one, and the new one's CR must stay put.
* Extra owners: a CR listing pods other than the one it is named after. The admission policy refuses
  it to a pod's token; an observer's peer set never shows the other pods with that CR's data (the join
  reads only the CR named after a pod); and the registrar of the CR's pod removes the extra owners.
"""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

import pytest

from devcluster.cluster import ControlPlane, free_port
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.sidecars import write_token_kubeconfig
from devcluster.waiting import wait_for
from discovery_client.client import DiscoveryClient
from sidecar.app.config import load_settings
from sidecar.app.daemon import Sidecar
from sidecar.kube.api import ApiError, KubeApi, WatchStream
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

WATCH_ALWAYS = {"DISCOVERY_WATCH": "always"}
"""The registrar follows its own CR through the CR watch: started at once, not on the first peer request."""

SERVICE_ACCOUNT = "discovery-sidecar"


def owner_ref(pod: dict[str, Any], controller: bool = False) -> dict[str, Any]:
    """A pod as an owner of a CR; ``controller=True`` is exactly how the sidecar writes its own (at most one
    reference may be the controller, so the extra owners these tests add are not)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod["metadata"]["name"],
        "uid": pod["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": False,
    }


def cr_body(name: str, owners: list[dict[str, Any]] | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if owners is not None:
        metadata["ownerReferences"] = owners
    return {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoWorkerMetadata",
        "metadata": metadata,
        # (not empty: an apply of "data: {}" over data this manager set leaves null, which the schema refuses)
        "spec": {"data": data if data is not None else {"endpoints": {}}},
    }


def owner_uids(obj: dict[str, Any] | None) -> list[str]:
    return [r["uid"] for r in ((obj or {}).get("metadata") or {}).get("ownerReferences") or ()]


def token_api(control_plane: ControlPlane, cluster: Cluster, pod: dict[str, Any], path: pathlib.Path) -> KubeApi:
    """A client holding the pod's own bound token (TokenRequest), as the kubelet would mount it."""
    token = cluster.pod_bound_token(pod["metadata"]["namespace"], SERVICE_ACCOUNT, pod)
    return KubeApi.from_kubeconfig(str(write_token_kubeconfig(control_plane, token, path)))


def impersonating_api(control_plane: ControlPlane, pod: dict[str, Any]) -> KubeApi:
    """A client the API server sees exactly as the pod's bound token: the service account user with the
    pod-name and pod-uid extras, so RBAC and the admission policy judge it alike (the groups are the service
    account's, added by the API server). Unlike the token it does not die with the pod: a pod-bound token
    is rejected (401) once its pod is gone or replaced, after the API server's token cache (up to 10 s)
    forgets it. The old incarnation of the reliability run fought its successor within that window; with
    this client the fight would go on for as long as the test lets it, so a registrar that does not stop
    by itself is caught for sure."""
    namespace, name, uid = (pod["metadata"][k] for k in ("namespace", "name", "uid"))
    api = KubeApi.from_kubeconfig(str(control_plane.kubeconfig))
    api.api_client.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}")
    api.api_client.set_default_header("Impersonate-Extra-authentication.kubernetes.io%2fpod-name", name)
    api.api_client.set_default_header("Impersonate-Extra-authentication.kubernetes.io%2fpod-uid", uid)
    return api


class CrEvents:
    """An admin's watch on one CR name: every event, with its type, object UID, resourceVersion and owners."""

    def __init__(self, control_plane: ControlPlane, namespace: str, name: str) -> None:
        self.api = KubeApi.from_kubeconfig(str(control_plane.kubeconfig))
        collection = WORKER_METADATA.collection(namespace)
        selector = ("fieldSelector", f"metadata.name={name}")
        start = self.api.get(collection, [selector])["metadata"]["resourceVersion"]
        self.events: list[tuple[str, str, str, list[str]]] = []
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)
        self._stream: WatchStream = self.api.stream(
            collection, [selector, ("watch", "1"), ("resourceVersion", start), ("timeoutSeconds", "600")], 120
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                with self._grew:
                    self.events.append(
                        (event["type"], meta.get("uid", ""), meta.get("resourceVersion", ""), owner_uids(obj))
                    )
                    self._grew.notify_all()
        except Exception:  # noqa: BLE001 - the stream is closed under the reader at the end of the test
            return

    def more_within(self, seen: int, seconds: float) -> bool:
        """Whether an event beyond the first ``seen`` arrives within ``seconds`` (returns as soon as one does)."""
        with self._grew:
            return self._grew.wait_for(lambda: len(self.events) > seen, seconds)

    def snapshot(self) -> list[tuple[str, str, str, list[str]]]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self._stream.close()
        self._thread.join(5)
        self.api.close()


def in_process_sidecar(
    pod: dict[str, Any], kubeconfig: pathlib.Path, tmp_path: pathlib.Path, api: KubeApi | None
) -> Sidecar:
    settings = load_settings(
        environ={
            "POD_NAME": pod["metadata"]["name"],
            "POD_NAMESPACE": pod["metadata"]["namespace"],
            "POD_UID": pod["metadata"]["uid"],
            "KUBECONFIG": str(kubeconfig),
            "DISCOVERY_SERVICE_NAME": "w",
            "DISCOVERY_METADATA": json.dumps({"incarnation": 1}),
            "DISCOVERY_GRPC_LISTEN": f"127.0.0.1:{free_port()}",
            "DISCOVERY_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            "DISCOVERY_PODINFO_DIR": str(tmp_path / "none"),
            "DISCOVERY_BACKOFF_MAX": "1s",
            # Its registrar reacts to its CR through the CR watch, which DISCOVERY_WATCH=auto starts only on a
            # peer request (without it, the 60 s resync notices the same things).
            "DISCOVERY_WATCH": "always",
        }
    )
    return Sidecar(settings, transport=api)


# -- A: a replaced pod incarnation stops writing ----------------------------------------------------------
@pytest.mark.parametrize("old_credential", ["impersonated", "pod-bound-token"])
def test_a_replaced_incarnation_stops_writing_and_leaves_the_new_one_alone(
    old_credential: str, control_plane: ControlPlane, namespace: str, cluster: Cluster, sidecars: Sidecars, tmp_path
) -> None:
    """Pod t-0 (U1) is force-deleted while its sidecar runs and is recreated (U2) with its own sidecar.

    The old sidecar (in-process, so its registrar can be asked) must report superseded within a deadline and
    fail readiness; the CR must end owned by U2 and stay so (its uid and resourceVersion stop changing:
    a handful of ADDED/DELETED events on a watch, not the hundreds of the reliability run); the new sidecar's
    registration must be stable; and the old one's deregistration must not delete the new one's CR.

    "impersonated": the old sidecar keeps credentials that pass RBAC and admission as its pod's token did
    (see ``impersonating_api``), so only the sidecar itself can stop the fight. "pod-bound-token": its real
    token, which the API server rejects (401) at most ~10 s after the replacement: by then the old sidecar
    has either seen the new pod's CR and stopped (superseded) or been locked out; either way it writes nothing
    after the new one registered, and readiness fails.
    """
    cluster.create_service(namespace, "w", {"app": "w"})
    old_pod = cluster.start_pod(namespace, "t-0", {"app": "w"})
    u1 = old_pod["metadata"]["uid"]
    path = WORKER_METADATA.item(namespace, "t-0")
    if old_credential == "impersonated":
        old = in_process_sidecar(old_pod, control_plane.kubeconfig, tmp_path, impersonating_api(control_plane, old_pod))
    else:
        token = cluster.pod_bound_token(namespace, SERVICE_ACCOUNT, old_pod)
        old = in_process_sidecar(
            old_pod, write_token_kubeconfig(control_plane, token, tmp_path / "old.kc"), tmp_path, None
        )
    old.start()
    events: CrEvents | None = None
    try:
        wait_for(
            lambda: not old.readiness_problems(), 30, what=f"the old sidecar to be ready ({old.readiness_problems()})"
        )
        first = cluster.get_or_none(path)
        assert first is not None and owner_uids(first) == [u1]
        old_cr_uid = first["metadata"]["uid"]
        events = CrEvents(control_plane, namespace, "t-0")

        cluster.delete_pod(namespace, "t-0", grace_seconds=0)
        wait_for(lambda: cluster.get_or_none(f"/api/v1/namespaces/{namespace}/pods/t-0") is None, 30, what="U1 gone")
        new_pod = cluster.start_pod(namespace, "t-0", {"app": "w"})
        u2 = new_pod["metadata"]["uid"]
        assert u2 != u1
        new = sidecars.start(new_pod, "w", metadata={"incarnation": 2}, extra_env=WATCH_ALWAYS)

        # Which one depends on when the old sidecar first sees a conflict: the garbage collector deleting its CR
        # (U1 is gone) may come before U2 exists; the new sidecar's CR comes after.
        superseded = {
            f"this pod incarnation (uid {u1}) no longer exists: pod t-0 is now uid {u2} — the sidecar stopped writing",
            f"this pod incarnation (uid {u1}) no longer exists: pod t-0 was deleted — the sidecar stopped writing",
        }

        def old_stopped() -> bool:
            if old.publisher.superseded:
                return True
            locked_out = any("401" in p or "rejected the credentials" in p for p in old.readiness_problems())
            return old_credential == "pod-bound-token" and locked_out

        wait_for(old_stopped, 30, what=f"the old sidecar to stop writing ({old.readiness_problems()})")
        if old_credential == "impersonated":
            assert old.publisher.superseded
        if old.publisher.superseded:
            (problem,) = old.publisher.problems()
            assert problem in superseded
            assert problem in old.readiness_problems(), "readiness fails through publisher.problems()"
            assert old.publisher.registration().registered is False
        assert old.readiness_problems(), "the old sidecar is not ready any more"

        new.wait_ready()
        final = wait_for(
            lambda: (lambda o: o if owner_uids(o) == [u2] else None)(cluster.get_or_none(path)),
            30,
            what="the CR to be owned by U2",
        )
        assert final["spec"]["data"] == {"incarnation": 2}
        # The GET can be ahead of the watch: count from the event that brought this very version.
        final_version = final["metadata"]["resourceVersion"]
        wait_for(lambda: any(e[2] == final_version for e in events.snapshot()), 30, what="the watch to catch up")
        settled = len(events.snapshot())

        # A quiet period: nothing writes the CR any more (the bug re-applied it every few milliseconds).
        assert not events.more_within(settled, 5.0), f"the CR changed after settling: {events.snapshot()[settled:]}"
        later = cluster.get_or_none(path)
        assert later is not None
        assert (later["metadata"]["uid"], later["metadata"]["resourceVersion"]) == (
            final["metadata"]["uid"],
            final["metadata"]["resourceVersion"],
        ), f"the CR changed during the quiet period: {events.snapshot()[settled:]}"
        assert events.snapshot()[settled:] == []
        seen = events.snapshot()
        assert ("DELETED", old_cr_uid) in [(kind, uid) for kind, uid, _, _ in seen], f"the watch saw nothing: {seen}"
        assert any(kind == "ADDED" and owners == [u2] for kind, _, _, owners in seen), seen
        flaps = [e for e in seen if e[0] in ("ADDED", "DELETED")]
        assert len(flaps) <= 6, f"the CR was deleted and re-created {len(flaps)} times: {seen}"
        assert all(owners == [u2] for kind, _, _, owners in seen[-1:]), seen
        with DiscoveryClient(new.target) as client:
            me = client.get_self()
        assert me.registered and me.uid == u2
        assert me.metadata_resource_version == final["metadata"]["resourceVersion"], "U2's registration is stable"
        assert new.http_get("/readyz")[0] == 200

        # The old sidecar's SIGTERM: a superseded registrar deletes nothing (the CR is the new pod's).
        old.shutdown()
        after = cluster.get_or_none(path)
        assert after is not None and owner_uids(after) == [u2]
        assert after["metadata"]["resourceVersion"] == final["metadata"]["resourceVersion"]
    finally:
        old.shutdown()
        if events is not None:
            events.close()


# -- B: extra owners ------------------------------------------------------------------------------------
@pytest.fixture
def three_pods(namespace: str, cluster: Cluster) -> dict[str, dict[str, Any]]:
    cluster.create_service(namespace, "w", {"app": "w"})
    return {name: cluster.start_pod(namespace, name, {"app": "w"}) for name in ("a", "b", "c")}


def test_admission_policy_admits_only_the_pod_itself_as_owner(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, three_pods: dict[str, dict[str, Any]], tmp_path
) -> None:
    """A's bound token may write A's CR owned by A alone: not with B or C added (apply or merge patch), not
    with A's name under another UID, not with no owner or an owner of another kind. Deleting its CR is not
    judged by owners (fencing deletes a CR of its name owned by an earlier incarnation)."""
    a, b, c = (three_pods[n] for n in ("a", "b", "c"))
    api = token_api(control_plane, cluster, a, tmp_path / "a.kubeconfig")
    path = WORKER_METADATA.item(namespace, "a")
    try:
        created = api.apply(path, cr_body("a", [owner_ref(a)], {"v": 1}), "discovery-sidecar")
        assert owner_uids(created) == [a["metadata"]["uid"]], "A's normal apply is allowed"

        def refused(call: Any) -> str:
            with pytest.raises(ApiError) as raised:
                call()
            assert raised.value.status == 403, raised.value
            return raised.value.message

        message = refused(
            lambda: api.merge_patch(path, {"metadata": {"ownerReferences": [owner_ref(a), owner_ref(b), owner_ref(c)]}})
        )
        assert "a pod may name only itself as the owner of its DynamoWorkerMetadata" in message
        assert f"uid {a['metadata']['uid']}" in message and "got 3 owner reference(s)" in message
        wrong_uid = dict(owner_ref(a), uid=c["metadata"]["uid"])
        message = refused(lambda: api.apply(path, cr_body("a", [wrong_uid]), "discovery-sidecar"))
        assert f"Pod/a uid {c['metadata']['uid']}" in message
        refused(lambda: api.apply(path, cr_body("a", [owner_ref(a), owner_ref(c)]), "discovery-sidecar"))
        refused(lambda: api.apply(path, cr_body("a", [dict(owner_ref(c), name="a")]), "discovery-sidecar"))
        refused(lambda: api.apply(path, cr_body("a", [dict(owner_ref(a), kind="ConfigMap")]), "discovery-sidecar"))
        refused(lambda: api.merge_patch(path, {"metadata": {"ownerReferences": None}}))
        refused(lambda: api.merge_patch(path, {"metadata": {"ownerReferences": [owner_ref(c)]}}))
        # A CR of its own name that it creates with no owner at all
        api.delete(path)
        refused(lambda: api.apply(path, cr_body("a", None), "discovery-sidecar"))
        assert cluster.get_or_none(path) is None

        # What the registrar does: apply owned by itself, and a merge patch setting exactly itself.
        again = api.apply(path, cr_body("a", [owner_ref(a)], {"v": 2}), "discovery-sidecar")
        cluster.api.merge_patch(path, {"metadata": {"ownerReferences": [owner_ref(a), owner_ref(c)]}})  # admin
        repaired = api.merge_patch(
            path,
            {
                "metadata": {
                    "resourceVersion": cluster.api.get(path)["metadata"]["resourceVersion"],
                    "ownerReferences": [owner_ref(a)],
                }
            },
        )
        assert owner_uids(repaired) == [a["metadata"]["uid"]]
        assert repaired["metadata"]["uid"] == again["metadata"]["uid"]
        assert repaired["spec"]["data"] == {"v": 2}

        # Fencing: a CR of its name owned by an earlier incarnation is A's to delete (DELETE checks no owners).
        # That owner UID exists nowhere, so the garbage collector may delete the CR first (a 404 is then
        # answered before admission): create it again until A's own delete is the one that removes it.
        api.delete(path)

        def deleted_by_a() -> bool | None:
            if cluster.get_or_none(path) is None:
                earlier = cr_body("a", [dict(owner_ref(a), uid="0e1d-earlier-incarnation")])
                cluster.api.create(WORKER_METADATA.collection(namespace), earlier)
            try:
                api.delete(path)
            except ApiError as exc:
                if exc.status == 404:
                    return None
                raise
            return True

        wait_for(deleted_by_a, 30, what="A's delete of a CR owned by an earlier incarnation to be admitted")
        assert cluster.get_or_none(path) is None
    finally:
        api.close()


def test_server_side_apply_keeps_owners_another_manager_added(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, three_pods: dict[str, dict[str, Any]], tmp_path
) -> None:
    """Why the registrar removes extra owners with a merge patch: entries another field manager merged into
    ownerReferences (a list keyed by uid) are that manager's, so a forced apply of the sidecar's own list
    leaves them; with them in place the admission policy refuses the pod's apply outright."""
    a, c = three_pods["a"], three_pods["c"]
    api = token_api(control_plane, cluster, a, tmp_path / "a.kubeconfig")
    path = WORKER_METADATA.item(namespace, "a")
    try:
        api.apply(path, cr_body("a", [owner_ref(a)]), "discovery-sidecar")
        cluster.api.merge_patch(path, {"metadata": {"ownerReferences": [owner_ref(a), owner_ref(c)]}})
        with pytest.raises(ApiError) as refused:
            api.apply(path, cr_body("a", [owner_ref(a)]), "discovery-sidecar")
        assert refused.value.status == 403 and "got 2 owner reference(s)" in refused.value.message
        # The same forced apply without admission in the way (an admin): C stays.
        applied = cluster.api.apply(path, cr_body("a", [owner_ref(a)]), "discovery-sidecar")
        assert owner_uids(applied) == [a["metadata"]["uid"], c["metadata"]["uid"]]
    finally:
        api.close()


def test_extra_owners_never_lend_a_pods_data_to_other_pods(
    namespace: str, cluster: Cluster, sidecars: Sidecars, three_pods: dict[str, dict[str, Any]]
) -> None:
    """An admin (bypassing admission) makes A's CR list B and C too, and creates a CR named after no pod that
    claims B and C. B and C are ready in the Service's EndpointSlice with no CR of their own: a running
    observer sidecar must never show them (WatchPeers and ListPeers), and shows C only once C registers,
    with C's own data. A registers the way Dynamo does (no sidecar), so nothing repairs the owners here."""
    a, b, c = (three_pods[n] for n in ("a", "b", "c"))
    observer_pod = cluster.start_pod(namespace, "observer", {"app": "w"})
    observer = sidecars.start(observer_pod, "w").wait_ready()
    cluster.register_like_dynamo(a, {"who": "a"})
    wait_for(
        lambda: cluster.ready_pods_in_slices(namespace, "w") == {"a": True, "b": True, "c": True, "observer": True},
        60,
        what="a, b, c and the observer ready in the EndpointSlice",
    )
    stream = StreamRecorder(observer.target)
    try:
        stream.wait_names({"a"})
        cluster.api.create(
            WORKER_METADATA.collection(namespace),
            cr_body("zzz-claims-others", [owner_ref(b), owner_ref(c)], {"who": "zzz"}),
        )
        cluster.api.merge_patch(
            WORKER_METADATA.item(namespace, "a"),
            {
                "metadata": {"ownerReferences": [owner_ref(a), owner_ref(b), owner_ref(c)]},
                "spec": {"data": {"marker": "after the owners changed"}},
            },
        )
        # Events on one collection arrive in order: once the marker shows, both changes were applied.
        stream.wait_until(
            lambda r: json.loads(r.peers()["a"].data_json).get("marker") == "after the owners changed",
            what="the observer to apply A's patched CR",
        )
        assert owner_uids(cluster.get_or_none(WORKER_METADATA.item(namespace, "a"))) == [
            a["metadata"]["uid"],
            b["metadata"]["uid"],
            c["metadata"]["uid"],
        ], "nothing removed the extra owners: the join alone must keep B and C out"
        shown = {p.name for u in stream.updates for p in (*u.added, *u.updated)}
        assert shown == {"a"}, f"pods shown with another CR's data: {shown - {'a'}}"
        assert set(stream.names()) == {"a"}
        with DiscoveryClient(observer.target) as client:
            listed = {p.name for p in client.list_peers().peers}
        assert listed == {"a"}

        cluster.register_like_dynamo(c, {"who": "c"})
        stream.wait_names({"a", "c"})
        peers = stream.peers()
        assert json.loads(peers["c"].data_json) == {"who": "c"}, "C joins with its own CR's data only"
        assert json.loads(peers["a"].data_json) == {"who": "a", "marker": "after the owners changed"}
        shown = {p.name for u in stream.updates for p in (*u.added, *u.updated)}
        assert "b" not in shown
    finally:
        stream.close()


def test_the_registrar_removes_owners_added_behind_its_back(
    namespace: str, cluster: Cluster, sidecars: Sidecars, three_pods: dict[str, dict[str, Any]]
) -> None:
    """A's sidecar (with A's bound token) sees its CR list C too and sets the owners back to exactly A:
    the same object (not re-created), the same data, through the admission policy."""
    a, c = three_pods["a"], three_pods["c"]
    process = sidecars.start(a, "w", metadata={"who": "a"}, extra_env=WATCH_ALWAYS).wait_ready()
    path = WORKER_METADATA.item(namespace, "a")
    before = cluster.get_or_none(path)
    assert before is not None and owner_uids(before) == [a["metadata"]["uid"]]
    cluster.api.merge_patch(path, {"metadata": {"ownerReferences": [owner_ref(a), owner_ref(c)]}})

    repaired = wait_for(
        lambda: (lambda o: o if o is not None and owner_uids(o) == [a["metadata"]["uid"]] else None)(
            cluster.get_or_none(path)
        ),
        30,
        what="A's sidecar to remove C from its CR's owners",
    )
    assert repaired["metadata"]["ownerReferences"] == [owner_ref(a, controller=True)]
    assert repaired["metadata"]["uid"] == before["metadata"]["uid"], "patched in place, not deleted and re-created"
    assert repaired["spec"]["data"] == {"who": "a"}
    events = [e.get("event") for e in process.log_events()]
    lost = [e for e in process.log_events() if e.get("event") == "registration lost; restoring it"]
    assert [e["reason"] for e in lost] == ["altered"] and "other owners" in lost[0]["detail"]
    assert "removing owners this pod did not put on its CR" in events
    assert "registration restored" in events
    assert process.http_get("/readyz")[0] == 200
