"""The registrar on a scripted API server (``tests.unit.fake_api``): fencing, apply, publish, the loop,
following its own CR, a replaced pod incarnation stopping (superseded), owners added behind its back,
and deregistration. The same against a real control plane, with real tokens, is
covered in tests/integration/test_registration.py.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import structlog
import urllib3

from devcluster.waiting import wait_for
from sidecar.core.instance_id import instance_id
from sidecar.kube.api import ApiError
from sidecar.kube.publisher import DYNAMO_FIELD_MANAGER, KubePublisher, Superseded, registration_error, spec_managers
from sidecar.kube.sources import WORKER_METADATA
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    Forbidden,
    Invalid,
    NotFound,
    NotRegistering,
    PodIdentity,
    Registration,
    RegistrationError,
    Unavailable,
)
from tests.unit.fake_api import DEADLINE, Call, ScriptedApi, gated

NS = "ns"
POD = PodIdentity("worker-0", NS, "uid-pod-new")
PATH = "/apis/nvidia.com/v1alpha1/namespaces/ns/dynamoworkermetadatas/worker-0"
POD_PATH = "/api/v1/namespaces/ns/pods/worker-0"
LABELS = {"app": "w", "role": "decode"}
SELF: dict[str, Any] = {"name": POD.name, "peer_uid": POD.uid, "instance_id": instance_id(POD.name)}
"""Who the registrar says this pod is (GetSelf): the CR's name, the pod UID, the name's SipHash."""
FIELD_MANAGER = "discovery-sidecar"


def dynamo_endpoint(instance: int, transport: dict[str, Any]) -> dict[str, Any]:
    """An Endpoint entry in the shape Dynamo 1.6.1 decodes (publish refuses any other)."""
    return {
        "type": "Endpoint",
        "namespace": "dynamo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": instance,
        "transport": transport,
    }


INITIAL: dict[str, Any] = {
    "endpoints": {"dynamo/backend/generate/1": dynamo_endpoint(1, {"nats_tcp": "dynamo.backend.generate"})},
    "model_cards": {},
    "event_channels": {},
}

NOT_FOUND = ApiError(404, "NotFound", 'dynamoworkermetadatas.nvidia.com "worker-0" not found')
CRD_MISSING = ApiError(404, "NotFound", "the server could not find the requested resource")
CONFLICT = ApiError(409, "Conflict", "Precondition failed: UID in precondition: cr-old, UID in object meta: cr-x")
FORBIDDEN = ApiError(403, "Forbidden", 'dynamoworkermetadatas.nvidia.com "worker-0" is forbidden')
PODS_FORBIDDEN = ApiError(403, "Forbidden", 'pods "worker-0" is forbidden: cannot get resource "pods"')
POD_NOT_FOUND = ApiError(404, "NotFound", 'pods "worker-0" not found')
OWN_REF = {
    "apiVersion": "v1",
    "kind": "Pod",
    "name": "worker-0",
    "uid": "uid-pod-new",
    "controller": True,
    "blockOwnerDeletion": False,
}


def cr(
    owner_uid: str, uid: str, rv: str, data: Mapping[str, Any] | None = None, name: str = "worker-0"
) -> dict[str, Any]:
    """A DynamoWorkerMetadata as the API server returns it, owned by the pod ``name``/``owner_uid``."""
    return {
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoWorkerMetadata",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "resourceVersion": rv,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": owner_uid}],
        },
        "spec": {"data": dict(data if data is not None else INITIAL)},
    }


def pod(uid: str) -> dict[str, Any]:
    """The Pod named worker-0 as the API server returns it, incarnation ``uid``."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker-0", "namespace": NS, "uid": uid}}


def with_owners(obj: dict[str, Any], *uids: str) -> dict[str, Any]:
    """``obj`` with more Pod owner references appended (what a merge patch of ownerReferences makes)."""
    for uid in uids:
        obj["metadata"]["ownerReferences"].append({"apiVersion": "v1", "kind": "Pod", "name": f"p-{uid}", "uid": uid})
    return obj


def in_namespace(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    obj["metadata"]["namespace"] = namespace
    return obj


def accepted(uid: str = "cr-new", rv: str = "11") -> Callable[[Call], dict[str, Any]]:
    """An apply answer: the applied body as the API server stores it, with its uid and resourceVersion."""

    def respond(call: Call) -> dict[str, Any]:
        obj: dict[str, Any] = copy.deepcopy(call.body)
        obj["metadata"].update(uid=uid, resourceVersion=rv)
        return dict(obj)

    return respond


def registered_gauge(registrar: KubePublisher) -> float | None:
    return registrar.metrics.registry.get_sample_value("discovery_registered")


class OwnWatchStub:
    """The watch of the publisher's own CR, as the publisher sees it (``sidecar.peers.own_watch.OwnWatch``):
    only whether it follows the CR. Its events are the tests' ``observe`` and ``relisted`` calls."""

    def __init__(self) -> None:
        self.healthy = True
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1

    def start(self) -> threading.Thread:
        raise NotImplementedError("the tests call observe and relisted themselves")

    def stop(self, timeout: float = 5.0) -> None:
        return None


class Rig:
    def __init__(self) -> None:
        self.api = ScriptedApi()
        self.registrar = KubePublisher(
            self.api.as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), backoff_max=0.05
        )
        self.own_watch = OwnWatchStub()
        self.registrar.own_watch = self.own_watch

    def register(self, uid: str = "cr-new", rv: str = "11") -> dict[str, Any]:
        """One successful apply (no CR yet), outside the loop."""
        self.api.on_get(NOT_FOUND).on_apply(accepted(uid, rv))
        return self.registrar.apply()

    def applied_bodies(self) -> list[dict[str, Any]]:
        return [c.body for c in self.api.calls_of("apply")]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.registrar.stop()
    r.api.close()
    assert not r.api.exhausted, f"unscripted API calls: {r.api.exhausted}"


# -- fencing -----------------------------------------------------------------------------------------------
class TestFencing:
    def test_cr_of_another_incarnation_is_deleted_with_preconditions_then_applied(self, rig: Rig) -> None:
        """A leftover CR owned by another pod UID is deleted, preconditioned on the uid and RV that were read,
        once the Pod of this name has been read and is this incarnation."""
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), pod(POD.uid), NOT_FOUND).on_delete({"kind": "Status"})
        rig.api.on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "get", "apply"], "read again: gone, then applied"
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH]
        assert not rig.registrar.superseded
        (delete,) = rig.api.calls_of("delete")
        assert delete.path == PATH
        assert delete.body == {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": "cr-old", "resourceVersion": "7"},
        }

    def test_conflict_on_delete_reads_again(self, rig: Rig) -> None:
        """409 on the fencing delete (the stale CR changed since it was read): read it again and retry."""
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), pod(POD.uid), cr("uid-pod-old", "cr-old", "8"), NOT_FOUND)
        rig.api.on_delete(CONFLICT, {"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "get", "delete", "get", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH, PATH], "the Pod is read once"
        preconditions = [c.body["preconditions"] for c in rig.api.calls_of("delete")]
        assert preconditions == [{"uid": "cr-old", "resourceVersion": "7"}, {"uid": "cr-old", "resourceVersion": "8"}]

    def test_not_found_on_delete_proceeds(self, rig: Rig) -> None:
        """404 on the fencing delete: someone else removed it already; apply."""
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), pod(POD.uid)).on_delete(NOT_FOUND).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "apply"]
        assert rig.registrar.registered.is_set()

    def test_own_cr_is_left_alone(self, rig: Rig) -> None:
        """A CR already owned by this pod incarnation is applied over, never deleted."""
        rig.api.on_get(cr(POD.uid, "cr-mine", "7")).on_apply(accepted("cr-mine", "8"))
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH], "no conflict: the Pod is not read"

    def test_same_uid_under_another_pod_name_is_not_ours(self, rig: Rig) -> None:
        """Ownership is the Pod's name and UID together: a reference naming another pod is fenced."""
        stale = cr(POD.uid, "cr-odd", "7")
        stale["metadata"]["ownerReferences"][0]["name"] = "worker-9"
        rig.api.on_get(stale, pod(POD.uid), NOT_FOUND).on_delete({"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "get", "apply"]

    def test_missing_crd_on_get_is_raised(self, rig: Rig) -> None:
        """404 "could not find the requested resource" means the CRD is not served: raise, apply nothing."""
        rig.api.on_get(CRD_MISSING)
        with pytest.raises(ApiError) as raised:
            rig.registrar.apply()

        assert raised.value.status == 404
        assert rig.api.methods() == ["get"]
        assert not rig.registrar.registered.is_set()


# -- apply -------------------------------------------------------------------------------------------------
class TestApplyBody:
    def test_apply_sends_the_desired_cr_under_the_field_manager_with_force(self, rig: Rig) -> None:
        """Server-side apply of the CR: name, labels, the Pod owner reference as Dynamo writes it, spec.data."""
        applied = rig.register(uid="cr-new", rv="11")

        (call,) = rig.api.calls_of("apply")
        assert call.path == PATH
        assert call.field_manager == FIELD_MANAGER
        assert call.force is True
        assert call.body == {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoWorkerMetadata",
            "metadata": {
                "name": "worker-0",
                "namespace": NS,
                "labels": LABELS,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": "worker-0",
                        "uid": "uid-pod-new",
                        "controller": True,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "spec": {"data": INITIAL},
        }
        assert applied["metadata"]["uid"] == "cr-new"
        assert rig.registrar.registration() == Registration(True, "11", INITIAL, LABELS, **SELF)
        assert registered_gauge(rig.registrar) == 1
        assert WORKER_METADATA.resource.item(NS, POD.name) == PATH


# -- publish -----------------------------------------------------------------------------------------------
class TestPublish:
    def test_replace_sets_the_whole_document(self, rig: Rig) -> None:
        """merge=False: spec.data becomes exactly the document sent."""
        document = {"endpoints": {}, "custom": {"weights": [1, 2]}}
        rig.api.on_get(NOT_FOUND).on_apply(accepted(rv="12"))
        result = rig.registrar.publish(document, merge=False)

        assert rig.applied_bodies()[0]["spec"]["data"] == document
        assert result == Registration(True, "12", document, LABELS, **SELF)
        assert rig.registrar.registration().data == document

    def test_merge_patch_changes_only_what_it_names(self, rig: Rig) -> None:
        """merge=True: RFC 7386 merge patch onto the current data (null deletes, objects merge, the rest stays)."""
        patch: dict[str, Any] = {
            "endpoints": {"dynamo/backend/generate/2": dynamo_endpoint(2, {"tcp": "x:1/2/dynamo/backend/generate"})},
            "model_cards": None,
            "extra": 1,
        }
        rig.api.on_get(NOT_FOUND).on_apply(accepted())
        rig.registrar.publish(patch, merge=True)

        assert rig.applied_bodies()[0]["spec"]["data"] == {
            "endpoints": {
                "dynamo/backend/generate/1": dynamo_endpoint(1, {"nats_tcp": "dynamo.backend.generate"}),
                "dynamo/backend/generate/2": dynamo_endpoint(2, {"tcp": "x:1/2/dynamo/backend/generate"}),
            },
            "event_channels": {},
            "extra": 1,
        }

    def test_successful_publish_returns_the_applied_registration(self, rig: Rig) -> None:
        """The Registration returned carries the resourceVersion and data of the object the API server stored,
        and GetSelf (``registration()``) then says the same."""
        rig.register(rv="11")
        stored = {"endpoints": {}, "custom": {"weights": [1.0, 2.0]}}  # e.g. numbers as the server keeps them
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(cr(POD.uid, "cr-new", "42", stored))
        result = rig.registrar.publish({"endpoints": {}, "custom": {"weights": [1, 2]}}, merge=False)

        assert result.registered is True
        assert result.resource_version == "42"
        assert result.data == stored
        assert result.labels == LABELS
        assert rig.registrar.registration() == result

    def test_an_emptied_object_stored_as_null_is_applied_again_so_it_is_stored_as_sent(self, rig: Rig) -> None:
        """Server-side apply stores an object this manager emptied as null; a second apply stores it as sent,
        and that is what the reply and GetSelf report (peers read the same stored object)."""
        card = {"type": "Model", "namespace": "dynamo", "component": "backend", "endpoint": "generate",
                "instance_id": 1, "card_json": {"display_name": "m"}}
        rig.register(rv="11")
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(accepted(rv="12"))
        rig.registrar.publish({"model_cards": {"dynamo/backend/generate/1": card}}, merge=False)
        emptied = {**card, "card_json": {}}
        nulled = {**card, "card_json": None}
        rig.api.on_get(cr(POD.uid, "cr-new", "12", {"model_cards": {"dynamo/backend/generate/1": card}}))
        rig.api.on_apply(
            cr(POD.uid, "cr-new", "13", {"model_cards": {"dynamo/backend/generate/1": nulled}}),
            cr(POD.uid, "cr-new", "14", {"model_cards": {"dynamo/backend/generate/1": emptied}}),
        )
        result = rig.registrar.publish({"model_cards": {"dynamo/backend/generate/1": emptied}}, merge=False)

        first, second = rig.applied_bodies()[-2:]
        assert first == second, "the same document, applied twice"
        assert result.resource_version == "14"
        assert result.data == {"model_cards": {"dynamo/backend/generate/1": emptied}}
        assert rig.registrar.registration() == result

    def test_keys_another_writer_added_to_the_data_are_removed(self, rig: Rig) -> None:
        """Server-side apply keeps keys another field manager added; a merge patch guarded by the resourceVersion
        written removes them, so peers read exactly what was published."""
        rig.register(rv="11")
        polluted = {**INITIAL, "foreign": {"f": 1}}
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(cr(POD.uid, "cr-new", "12", polluted))
        rig.api.on_merge_patch(cr(POD.uid, "cr-new", "13", INITIAL))
        result = rig.registrar.publish(INITIAL, merge=False)

        (patch,) = rig.api.calls_of("merge_patch")
        assert patch.body == {"metadata": {"resourceVersion": "12"}, "spec": {"data": {"foreign": None}}}
        assert result.data == INITIAL and result.resource_version == "13"

    @pytest.mark.parametrize(
        ("document", "merge"),
        [
            ({"endpoints": []}, False),
            ({"model_cards": "none"}, True),
            ({"event_channels": 3}, False),
            ({"endpoints": {"dynamo/backend/generate/1": {"component": None}}}, True),  # merge drops a field
        ],
        ids=[
            "endpoints-not-a-map",
            "merge-makes-model-cards-a-string",
            "event-channels-not-a-map",
            "an-entry-dynamo-would-refuse",
        ],
    )
    def test_invalid_data_raises_invalid_and_sends_nothing(
        self, rig: Rig, document: dict[str, Any], merge: bool
    ) -> None:
        """Data Dynamo could not read is refused before any request; the previous data stays."""
        with pytest.raises(Invalid):
            rig.registrar.publish(document, merge=merge)

        assert rig.api.calls == []
        assert rig.registrar.registration().data == INITIAL

    @pytest.mark.parametrize(
        ("error", "meaning", "code"),
        [
            (FORBIDDEN, Forbidden, "403"),
            (ApiError(404, "NotFound", 'namespaces "ns" not found'), NotFound, "404"),
            (ApiError(422, "Invalid", "spec.data: Invalid value"), Invalid, "422"),
            (ApiError(500, "InternalError", "etcdserver: request timed out"), Unavailable, "500"),
            (urllib3.exceptions.ProtocolError("Connection aborted."), Unavailable, "connection"),
            (ConnectionRefusedError(111, "Connection refused"), Unavailable, "connection"),
        ],
        ids=["403-forbidden", "404-not-found", "422-invalid", "500-unavailable", "protocol-error", "refused"],
    )
    def test_api_failures_map_to_meanings_and_keep_the_previous_data(
        self, rig: Rig, error: Exception, meaning: type[RegistrationError], code: str
    ) -> None:
        """A failed publish raises the port's error for its meaning; the previous data stays desired and applied."""
        rig.register(rv="11")
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(error)
        with pytest.raises(RegistrationError) as raised:
            rig.registrar.publish({"endpoints": {}, "new": True}, merge=False)

        assert type(raised.value) is meaning
        assert str(raised.value)
        assert rig.registrar.registration().data == INITIAL
        assert rig.registrar.registration().resource_version == "11"
        assert (
            rig.registrar.metrics.registry.get_sample_value(
                "discovery_api_errors_total", {"operation": "publish", "code": code}
            )
            == 1
        )
        # Had the failed publish landed after all (an answer lost on the way), the next pass restores the data.
        rig.api.on_get(cr(POD.uid, "cr-new", "12", {"endpoints": {}, "new": True})).on_apply(accepted(rv="13"))
        rig.registrar.apply()
        assert rig.applied_bodies()[-1]["spec"]["data"] == INITIAL, "the next apply sends the previous data"

    def test_forbidden_explains_the_rbac_fix(self, rig: Rig) -> None:
        """The Forbidden sentence tells the operator which manifest grants the permission."""
        rig.api.on_get(NOT_FOUND).on_apply(FORBIDDEN)
        with pytest.raises(Forbidden, match="manifests/rbac.yaml"):
            rig.registrar.publish({"endpoints": {}}, merge=False)

    def test_missing_crd_is_not_found_with_the_crd_fix(self, rig: Rig) -> None:
        """The CRD not being served (on the fencing read) is NotFound and names the CRD manifest."""
        rig.api.on_get(CRD_MISSING)
        with pytest.raises(NotFound, match="manifests/components/crd/crd.yaml"):
            rig.registrar.publish({"endpoints": {}}, merge=False)
        assert rig.api.methods() == ["get"]


# -- the loop ----------------------------------------------------------------------------------------------
class TestRunLoop:
    @pytest.mark.parametrize(
        ("error", "explanation"),
        [
            (FORBIDDEN, "forbidden to register this pod's DynamoWorkerMetadata"),
            (CRD_MISSING, "the DynamoWorkerMetadata CRD is not installed"),
            (ConnectionRefusedError(111, "refused"), "cannot reach the API server to register: ConnectionRefusedError"),
        ],
        ids=["forbidden", "crd-missing", "connection-refused"],
    )
    def test_error_is_reported_until_a_retry_succeeds(self, rig: Rig, error: Exception, explanation: str) -> None:
        """A failing apply makes problems() explain it and the gauge 0; the retry registers and clears both."""
        retry = threading.Event()
        rig.api.on_get(error, gated(retry, NOT_FOUND)).on_apply(accepted())
        rig.registrar.start()
        rig.api.wait_for_calls("get", 2)  # the retry is under way, held at its first request

        (problem,) = rig.registrar.problems()
        assert problem.startswith("not registered: ")
        assert explanation in problem
        assert registered_gauge(rig.registrar) == 0
        assert rig.registrar.registration().registered is False

        retry.set()
        assert rig.registrar.registered.wait(DEADLINE)
        assert rig.registrar.problems() == []
        assert registered_gauge(rig.registrar) == 1


# -- following its own CR ----------------------------------------------------------------------------------
class TestObserve:
    def test_deletion_of_own_cr_reapplies_it(self, rig: Rig) -> None:
        """DELETED of our CR (not while deregistering) marks us unregistered and wakes the loop to re-apply,
        once the Pod read first shows this incarnation is still the pod."""
        reapply = threading.Event()
        rig.api.on_get(NOT_FOUND, gated(reapply, pod(POD.uid)), NOT_FOUND)
        rig.api.on_apply(accepted("cr-1", "11"), accepted("cr-2", "20"))
        rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)

        rig.registrar.observe("DELETED", cr(POD.uid, "cr-1", "12"))
        rig.api.wait_for_calls("get", 2)
        assert rig.registrar.problems() == ["not registered: its DynamoWorkerMetadata ns/worker-0: it was deleted"]
        assert registered_gauge(rig.registrar) == 0

        reapply.set()
        rig.api.wait_for_calls("apply", 2)
        assert rig.registrar.registered.wait(DEADLINE)
        assert rig.registrar.registration().resource_version == "20"
        assert rig.applied_bodies()[1]["spec"]["data"] == INITIAL
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH]

    def test_cr_taken_over_by_another_owner_is_fenced_and_reapplied(self, rig: Rig) -> None:
        """A MODIFIED CR of our name owned by someone else wakes the loop, which fences it and applies ours."""
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-1", "11"))
        rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)
        foreign = cr("uid-pod-other", "cr-foreign", "30")
        rig.api.on_get(pod(POD.uid), foreign, NOT_FOUND).on_delete({"kind": "Status"})
        rig.api.on_apply(accepted("cr-2", "31"))

        rig.registrar.observe("MODIFIED", foreign)
        assert not rig.registrar.registered.is_set(), "not its own: not registered until restored"
        assert rig.registrar.problems() == [
            "not registered: its DynamoWorkerMetadata ns/worker-0: it belongs to another owner "
            "(Pod worker-0 uid uid-pod-other), not this pod incarnation"
        ]
        rig.api.wait_for_calls("apply", 2)

        assert rig.api.methods() == ["get", "apply", "get", "get", "delete", "get", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH, PATH], "the Pod first, once"
        assert rig.registrar.registered.wait(DEADLINE)
        assert rig.api.calls_of("delete")[0].body["preconditions"] == {"uid": "cr-foreign", "resourceVersion": "30"}
        assert not rig.registrar.superseded

    @pytest.mark.parametrize(
        "obj",
        [
            cr("uid-pod-1", "cr-other", "5", name="worker-1"),
            in_namespace(cr(POD.uid, "cr-elsewhere", "5"), "elsewhere"),
        ],
        ids=["another-pod", "another-namespace"],
    )
    def test_other_objects_are_ignored(self, rig: Rig, obj: dict[str, Any]) -> None:
        """Events about other CRs neither unregister us nor count as our CR going away."""
        rig.register()

        for kind in ("ADDED", "MODIFIED", "DELETED"):
            rig.registrar.observe(kind, obj)

        assert rig.registrar.registered.is_set()
        assert registered_gauge(rig.registrar) == 1
        rig.api.on_delete({"kind": "Status"}).on_get(cr(POD.uid, "cr-new", "11"))
        assert rig.registrar.deregister(timeout=0.05) is False, "another CR's deletion does not confirm ours"

    @pytest.mark.parametrize(
        "obj",
        [cr("uid-pod-earlier", "cr-stale", "5"), cr(POD.uid, "cr-older", "5")],
        ids=["another-incarnation", "an-older-object-of-ours"],
    )
    def test_deletion_of_a_cr_that_is_not_the_one_applied_is_ignored(self, rig: Rig, obj: dict[str, Any]) -> None:
        """A late DELETED of the stale CR fencing removed (or of an older object of ours) is not our CR going
        away: we stay registered, nothing is re-applied, and it does not confirm a deregistration."""
        rig.register(uid="cr-new")

        rig.registrar.observe("DELETED", obj)

        assert rig.registrar.registered.is_set()
        assert rig.registrar.problems() == []
        rig.api.on_delete({"kind": "Status"}).on_get(cr(POD.uid, "cr-new", "11"))
        assert rig.registrar.deregister(timeout=0.05) is False
        assert rig.api.methods().count("apply") == 1


# -- deregistration ----------------------------------------------------------------------------------------
def deregister_async(registrar: KubePublisher, timeout: float = DEADLINE) -> Future[bool]:
    executor = ThreadPoolExecutor(max_workers=1)
    future = executor.submit(registrar.deregister, timeout)
    executor.shutdown(wait=False)
    return future


class TestDeregister:
    def test_delete_with_the_applied_uid_is_confirmed_by_the_watch(self, rig: Rig) -> None:
        """The delete is preconditioned on the applied UID; deregister returns True once the watch shows DELETED."""
        rig.register(uid="cr-mine")
        rig.api.on_delete({"kind": "Status"})
        future = deregister_async(rig.registrar)
        (delete,) = rig.api.wait_for_calls("delete", 1)

        assert delete.path == PATH
        assert delete.body == {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": "cr-mine"}}
        assert not future.done(), "not confirmed until the deletion comes back through the watch"
        assert not rig.registrar.registered.is_set()
        assert registered_gauge(rig.registrar) == 0

        rig.registrar.observe("DELETED", cr(POD.uid, "cr-mine", "12"))
        assert future.result(DEADLINE) is True

    def test_unconfirmed_deletion_is_read_back_once(self, rig: Rig) -> None:
        """Without the DELETED event within the timeout, one GET decides: still there, not confirmed."""
        rig.register()
        rig.api.on_delete({"kind": "Status"}).on_get(cr(POD.uid, "cr-new", "11"))
        assert rig.registrar.deregister(timeout=0.05) is False

    def test_without_a_healthy_watch_a_get_confirms_at_once(self, rig: Rig) -> None:
        """The own-CR watch is down: deregistration does not wait for an event that cannot come."""
        rig.register()
        rig.own_watch.healthy = False
        rig.api.on_delete({"kind": "Status"}).on_get(NOT_FOUND)
        with structlog.testing.capture_logs() as logs:
            assert rig.registrar.deregister(timeout=DEADLINE * 10) is True
        assert [e.get("confirmed_by_get") for e in logs if e["event"] == "deregistered"] == [True]

    def test_deregister_stops_the_loop_and_a_deletion_is_not_reapplied(self, rig: Rig) -> None:
        """While deregistering, our CR's DELETED event confirms the deletion and wakes nothing."""
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-mine", "11"))
        thread = rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)

        def deleted_and_seen_by_the_watch(call: Call) -> dict[str, Any]:
            rig.registrar.observe("DELETED", cr(POD.uid, "cr-mine", "12"))
            return {"kind": "Status"}

        rig.api.on_delete(deleted_and_seen_by_the_watch)

        assert rig.registrar.deregister(timeout=DEADLINE) is True
        assert not thread.is_alive()
        assert rig.api.methods() == ["get", "apply", "delete"]

    @pytest.mark.parametrize(
        ("error", "result"),
        [(NOT_FOUND, True), (CONFLICT, True)],
        ids=["404-already-gone", "409-newer-incarnation"],
    )
    def test_gone_or_replaced_counts_as_deregistered(self, rig: Rig, error: ApiError, result: bool) -> None:
        """404: nothing left to delete; 409: the UID precondition failed, a newer incarnation owns the name."""
        rig.register()
        rig.api.on_delete(error)
        assert rig.registrar.deregister(timeout=DEADLINE) is result

    def test_forbidden_returns_false_and_logs_why(self, rig: Rig) -> None:
        """403 on the delete: not deregistered, and an error line explains the RBAC fix."""
        rig.register()
        rig.api.on_delete(FORBIDDEN)
        with structlog.testing.capture_logs() as logs:
            assert rig.registrar.deregister(timeout=DEADLINE) is False

        (line,) = [e for e in logs if e["event"] == "deregistration failed"]
        assert line["log_level"] == "error"
        assert "forbidden to delete this pod's DynamoWorkerMetadata" in line["reason"]
        assert "manifests/rbac.yaml" in line["reason"]

    def test_publish_while_deregistering_does_not_recreate_the_cr(self, rig: Rig) -> None:
        """Once deregistration has deleted the CR, a publish (the gRPC server still serves while the deletion is
        awaited) must not apply it again: peers would see the terminating pod come back until the Pod is collected.
        """
        rig.register(uid="cr-mine")
        rig.api.on_delete({"kind": "Status"})
        future = deregister_async(rig.registrar)
        rig.api.wait_for_calls("delete", 1)
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-resurrected", "13"))  # what the API server would answer

        error: RegistrationError | None = None
        try:
            rig.registrar.publish({"endpoints": {}}, merge=False)
        except RegistrationError as exc:
            error = exc
        finally:
            rig.registrar.observe("DELETED", cr(POD.uid, "cr-mine", "12"))
            assert future.result(DEADLINE) is True

        assert rig.api.methods() == ["get", "apply", "delete"], "nothing may be sent after the deregistering delete"
        assert error is not None, "publish must fail once deregistration started"
        assert not rig.registrar.registered.is_set()


# -- a replaced pod incarnation stops writing (superseded) -------------------------------------------------
SUPERSEDED_BY_NEWER = (
    "this pod incarnation (uid uid-pod-new) no longer exists: pod worker-0 is now uid uid-pod-newer"
    " — the sidecar stopped writing"
)
SUPERSEDED_BY_DELETION = (
    "this pod incarnation (uid uid-pod-new) no longer exists: pod worker-0 was deleted — the sidecar stopped writing"
)


class TestSuperseded:
    @pytest.mark.parametrize(
        ("pod_answer", "message"),
        [(pod("uid-pod-newer"), SUPERSEDED_BY_NEWER), (POD_NOT_FOUND, SUPERSEDED_BY_DELETION)],
        ids=["pod-has-another-uid", "pod-is-gone"],
    )
    def test_a_cr_of_another_owner_with_our_pod_gone_supersedes_without_writing(
        self, rig: Rig, pod_answer: Any, message: str
    ) -> None:
        """Fencing would delete the newer incarnation's CR: the Pod read first shows this incarnation is the
        stale one, so nothing is deleted or applied, now or ever, and problems() says why."""
        rig.api.on_get(cr("uid-pod-newer", "cr-newer", "40"), pod_answer)
        with structlog.testing.capture_logs() as logs, pytest.raises(Superseded) as raised:
            rig.registrar.apply()

        assert str(raised.value) == message
        assert isinstance(raised.value, Forbidden), "retrying will not help: the gRPC layer says PERMISSION_DENIED"
        assert rig.api.methods() == ["get", "get"], "no delete, no apply"
        assert rig.registrar.superseded
        assert rig.registrar.problems() == [message]
        assert not rig.registrar.registered.is_set()
        assert rig.registrar.registration().registered is False
        assert registered_gauge(rig.registrar) == 0
        (line,) = [e for e in logs if e["event"] == "pod incarnation superseded: the sidecar stopped writing"]
        assert line["log_level"] == "error" and line["reason"] == message

        # for good: nothing more is sent, whatever asks
        with structlog.testing.capture_logs() as later:
            with pytest.raises(Superseded):
                rig.registrar.apply()
            with pytest.raises(Superseded):
                rig.registrar.publish({"endpoints": {}}, merge=False)
        assert rig.api.methods() == ["get", "get"]
        assert rig.registrar.registration().data == INITIAL, "a refused publish keeps the previous data"
        assert not [e for e in later if e["event"].startswith("pod incarnation superseded")], "logged once"

    def test_forbidden_pod_read_logs_a_hint_once_and_fences_as_before(self, rig: Rig) -> None:
        """Without get on pods the check cannot be made: fencing goes on as it always did, with one hint."""
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), PODS_FORBIDDEN, NOT_FOUND, cr("uid-pod-old", "cr-old2", "9"))
        rig.api.on_get(PODS_FORBIDDEN, NOT_FOUND)
        rig.api.on_delete({"kind": "Status"}, {"kind": "Status"}).on_apply(accepted(), accepted())
        with structlog.testing.capture_logs() as logs:
            rig.registrar.apply()
            rig.registrar.apply(force=True)

        assert rig.api.methods() == ["get", "get", "delete", "get", "apply"] * 2
        assert not rig.registrar.superseded
        assert rig.registrar.registered.is_set()
        hints = [e for e in logs if e["event"] == "cannot tell whether this pod incarnation still exists"]
        assert len(hints) == 1
        assert "get on pods (manifests/rbac.yaml)" in hints[0]["hint"]
        assert "forbidden to get this pod" in hints[0]["reason"]

    @pytest.mark.parametrize(
        "error",
        [ApiError(500, "InternalError", "etcdserver: leader changed"), ConnectionRefusedError(111, "refused")],
        ids=["500", "refused"],
    )
    def test_unanswered_pod_read_deletes_nothing(self, rig: Rig, error: Exception) -> None:
        """Whose the name is cannot be told: nothing is deleted this pass; the next pass asks again."""
        rig.api.on_get(cr("uid-pod-other", "cr-other", "7"), error)
        with pytest.raises(type(error)):
            rig.registrar.apply()
        assert rig.api.methods() == ["get", "get"]
        assert not rig.registrar.superseded

        rig.api.on_get(cr("uid-pod-other", "cr-other", "7"), pod(POD.uid), NOT_FOUND).on_delete({"kind": "Status"})
        rig.api.on_apply(accepted())
        rig.registrar.apply()
        assert rig.api.methods()[2:] == ["get", "get", "delete", "get", "apply"]

    @pytest.mark.parametrize(
        ("kind", "obj"),
        [("MODIFIED", cr("uid-pod-newer", "cr-newer", "40")), ("DELETED", cr(POD.uid, "cr-1", "12"))],
        ids=["taken-over", "deleted-by-the-new-incarnations-fencing"],
    )
    def test_the_watch_showing_another_owner_makes_the_loop_read_the_pod_first(
        self, rig: Rig, kind: str, obj: dict[str, Any]
    ) -> None:
        """The fight of the reliability run: the old incarnation's sidecar sees the new one's CR (or its own
        deleted by the new one's fencing) and would re-apply. Its next pass reads the Pod before anything else
        (even if the CR looked like its own again by then), finds another UID and stops: no GET of the CR, no
        delete, no apply. The thread stays alive (liveness) until stopped."""
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-1", "11"))
        thread = rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)
        rig.api.on_get(pod("uid-pod-newer"))

        rig.registrar.observe(kind, obj)
        rig.api.wait_for_calls("get", 2)

        assert rig.api.methods() == ["get", "apply", "get"]
        assert rig.api.calls_of("get")[1].path == POD_PATH
        wait_for(lambda: rig.registrar.superseded, DEADLINE, interval=0.01, what="superseded")
        assert rig.registrar.problems() == [SUPERSEDED_BY_NEWER]
        assert thread.is_alive(), "superseded is not dead: the loop idles until the daemon stops it"
        # what the watch says next (the new incarnation's CR changing, or deleted) wakes nothing
        for kind in ("ADDED", "MODIFIED", "DELETED"):
            rig.registrar.observe(kind, cr("uid-pod-newer", "cr-newer", "41"))
            rig.registrar.observe(kind, cr(POD.uid, "cr-1", "42"))
        assert rig.api.methods() == ["get", "apply", "get"]
        assert rig.registrar.deregister(timeout=DEADLINE) is True
        assert not thread.is_alive()
        assert rig.api.methods() == ["get", "apply", "get"], "deregistering deletes nothing: the CR is the new pod's"

    def test_a_superseded_registrar_deregisters_nothing(self, rig: Rig) -> None:
        """SIGTERM after being superseded: no delete at all (even UID-preconditioned: the new incarnation may
        have taken over the very object this one applied)."""
        rig.register(uid="cr-mine")
        rig.api.on_get(cr("uid-pod-newer", "cr-mine", "50"), pod("uid-pod-newer"))
        with pytest.raises(Superseded):
            rig.registrar.apply()
        with structlog.testing.capture_logs() as logs:
            assert rig.registrar.deregister(timeout=DEADLINE) is True
        assert "delete" not in rig.api.methods()
        assert any(e["event"].startswith("not deregistering: this pod incarnation was superseded") for e in logs)

    @pytest.mark.parametrize(
        ("pod_answer", "deleted"),
        [(pod("uid-pod-newer"), False), (pod(POD.uid), True)],
        ids=["replaced-no-delete", "still-ours-deletes"],
    )
    def test_deregister_with_an_unchecked_conflict_reads_the_pod_first(
        self, rig: Rig, pod_answer: dict[str, Any], deleted: bool
    ) -> None:
        """The watch showed the CR of this name owned by another UID and no pass has checked it yet: the Pod is
        read before the deregistering delete, which is skipped when this incarnation was replaced."""
        rig.register(uid="cr-mine")
        rig.registrar.observe("MODIFIED", cr("uid-pod-newer", "cr-mine", "50"))
        rig.api.on_get(pod_answer)
        if deleted:
            rig.api.on_delete(CONFLICT)  # (the new incarnation's object: the UID precondition protects it)
        assert rig.registrar.deregister(timeout=DEADLINE) is True
        assert rig.api.methods() == ["get", "apply", "get", *(["delete"] if deleted else [])]
        assert rig.api.calls_of("get")[1].path == POD_PATH
        assert rig.registrar.superseded is not deleted


# -- owners added behind the registrar's back --------------------------------------------------------------
class TestExtraOwners:
    def test_extra_owners_are_removed_with_a_merge_patch_guarded_by_the_resource_version(self, rig: Rig) -> None:
        """Our CR listing other pods too: a merge patch sets exactly our owner reference (server-side apply
        would leave entries another field manager added, and the admission policy refuses such an apply)."""
        rig.api.on_get(with_owners(cr(POD.uid, "cr-mine", "7"), "uid-pod-b", "uid-pod-c"))
        rig.api.on_merge_patch(cr(POD.uid, "cr-mine", "8")).on_apply(accepted("cr-mine", "9"))
        with structlog.testing.capture_logs() as logs:
            rig.registrar.apply()

        assert rig.api.methods() == ["get", "merge_patch", "apply"], "not a conflict: the Pod is not read"
        (patch,) = rig.api.calls_of("merge_patch")
        assert patch.path == PATH
        assert patch.body == {"metadata": {"resourceVersion": "7", "ownerReferences": [OWN_REF]}}
        assert rig.applied_bodies()[0]["metadata"]["ownerReferences"] == [OWN_REF]
        (line,) = [e for e in logs if e["event"] == "removing owners this pod did not put on its CR"]
        assert line["owners"] == [("Pod", "p-uid-pod-b", "uid-pod-b"), ("Pod", "p-uid-pod-c", "uid-pod-c")]

    def test_conflict_on_the_owner_patch_reads_again(self, rig: Rig) -> None:
        """409: the CR changed since it was read; read it again (now clean: nothing to patch) and apply."""
        rig.api.on_get(with_owners(cr(POD.uid, "cr-mine", "7"), "uid-pod-c"), cr(POD.uid, "cr-mine", "8"))
        rig.api.on_merge_patch(ApiError(409, "Conflict", "the object has been modified")).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "merge_patch", "get", "apply"]

    def test_another_uid_under_our_name_in_the_owners_is_an_extra_owner(self, rig: Rig) -> None:
        """An owner reference with our name but another UID (or our UID under another kind) is not ours."""
        obj = cr(POD.uid, "cr-mine", "7")
        obj["metadata"]["ownerReferences"] += [
            {"apiVersion": "v1", "kind": "Pod", "name": "worker-0", "uid": "uid-pod-old"},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "worker-0", "uid": POD.uid},
        ]
        rig.api.on_get(obj).on_merge_patch(cr(POD.uid, "cr-mine", "8")).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.calls_of("merge_patch")[0].body["metadata"]["ownerReferences"] == [OWN_REF]

    def test_the_watch_showing_extra_owners_wakes_the_loop_to_remove_them(self, rig: Rig) -> None:
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-1", "11"))
        rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)
        tampered = with_owners(cr(POD.uid, "cr-1", "12"), "uid-pod-c")
        rig.api.on_get(tampered).on_merge_patch(cr(POD.uid, "cr-1", "13")).on_apply(accepted("cr-1", "14"))

        rig.registrar.observe("MODIFIED", tampered)
        rig.api.wait_for_calls("apply", 2)

        assert rig.api.methods() == ["get", "apply", "get", "merge_patch", "apply"]
        assert not rig.registrar.superseded


def test_unauthorized_says_a_pod_bound_token_dies_with_its_pod() -> None:
    """401: the credentials were rejected; the sentence names the usual cause (the pod was replaced)."""
    error = registration_error(ApiError(401, "Unauthorized", "Unauthorized"), "register")
    assert isinstance(error, Forbidden)
    assert "pod-bound token stops working once its pod is deleted or replaced" in str(error)


# -- living with Dynamo's runtime in the same pod, and restarts -------------------------------------------------
def managed_by(obj: dict[str, Any], *managers: str) -> dict[str, Any]:
    """``obj`` with managedFields entries in which each of ``managers`` owns spec.data (as apply records it)."""
    obj["metadata"]["managedFields"] = [
        {
            "manager": m,
            "operation": "Apply",
            "apiVersion": "nvidia.com/v1alpha1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:data": {}}, "f:metadata": {"f:ownerReferences": {}}},
        }
        for m in managers
    ]
    return obj


DYNAMO_DATA: dict[str, Any] = {
    "endpoints": {"dynamo/backend/generate/2": dynamo_endpoint(2, {"tcp": "10.0.0.2:9000/2/dynamo/backend/generate"})},
    "model_cards": {},
    "event_channels": {},
    "event_sources": {},
}


class TestWatchOnly:
    def test_spec_managers_reads_managed_fields(self) -> None:
        obj = managed_by(cr(POD.uid, "cr-1", "1"), DYNAMO_FIELD_MANAGER, FIELD_MANAGER)
        obj["metadata"]["managedFields"].append({"manager": "kubectl", "fieldsV1": {"f:metadata": {}}})
        assert spec_managers(obj) == {DYNAMO_FIELD_MANAGER, FIELD_MANAGER}
        assert spec_managers(cr(POD.uid, "cr-1", "1")) == set()

    def test_a_cr_dynamo_manages_at_start_up_is_left_alone(self, rig: Rig) -> None:
        """Found before the first write: nothing is written, ever; the peers are still served (not a problem)."""
        dynamo_cr = managed_by(cr(POD.uid, "cr-d", "5", DYNAMO_DATA), DYNAMO_FIELD_MANAGER)
        rig.api.on_get(dynamo_cr)
        rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)
        wait_for(lambda: rig.registrar.watch_only, DEADLINE, what="watch-only")

        assert rig.api.methods() == ["get"], "no apply, no delete"
        assert rig.registrar.problems() == []
        (note,) = rig.registrar.notes()
        assert "watch-only" in note and "'dynamo-worker'" in note
        me = rig.registrar.registration()
        assert (me.registered, me.resource_version, me.data) == (True, "5", DYNAMO_DATA), "GetSelf shows Dynamo's CR"
        with pytest.raises(NotRegistering, match="managed by 'dynamo-worker'"):
            rig.registrar.publish({"x": 1}, merge=False)
        assert rig.registrar.deregister(timeout=0.1) is True
        assert rig.api.methods() == ["get"], "SIGTERM deletes nothing: Dynamo keeps its CR until garbage collection"

    def test_dynamo_taking_over_later_is_seen_through_the_watch(self, rig: Rig) -> None:
        """Registered first, then Dynamo applies over the CR: from that event on the sidecar writes nothing."""
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-1", "11"))
        rig.registrar.start()
        assert rig.registrar.registered.wait(DEADLINE)

        rig.registrar.observe(
            "MODIFIED", managed_by(cr(POD.uid, "cr-1", "12", DYNAMO_DATA), FIELD_MANAGER, DYNAMO_FIELD_MANAGER)
        )
        assert rig.registrar.watch_only
        assert rig.registrar.registration().data == DYNAMO_DATA
        with pytest.raises(NotRegistering):
            rig.registrar.publish({"x": 1}, merge=False)
        rig.registrar.observe("DELETED", cr(POD.uid, "cr-1", "13"))
        assert not rig.registrar.registered.is_set(), "gone is gone: not re-created"
        assert rig.registrar.problems() == []
        assert rig.api.methods() == ["get", "apply"]

    def test_a_stale_dynamo_cr_of_another_incarnation_is_still_fenced(self, rig: Rig) -> None:
        """Only this incarnation's CR is yielded to: Dynamo's CR left by an earlier pod of the name is replaced."""
        stale = managed_by(cr("uid-pod-old", "cr-old", "7", DYNAMO_DATA), DYNAMO_FIELD_MANAGER)
        rig.api.on_get(stale, pod(POD.uid), NOT_FOUND).on_delete({"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()
        assert rig.api.methods() == ["get", "get", "delete", "get", "apply"]
        assert not rig.registrar.watch_only

    def test_never_registers_nothing_and_is_ready(self) -> None:
        api = ScriptedApi()
        registrar = KubePublisher(api.as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), register="never")
        try:
            registrar.start()
            with pytest.raises(NotRegistering, match="DISCOVERY_REGISTER=never"):
                registrar.publish({"x": 1}, merge=False)
            assert registrar.problems() == [] and "DISCOVERY_REGISTER=never" in registrar.notes()[0]
            assert registrar.deregister(timeout=0.1) is True
            assert api.methods() == []
        finally:
            registrar.stop()
            api.close()

    def test_an_unknown_mode_is_refused(self) -> None:
        with pytest.raises(ValueError, match="register must be one of"):
            KubePublisher(ScriptedApi().as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), register="maybe")


class TestRestart:
    def test_the_data_this_incarnation_published_before_a_restart_is_kept(self, rig: Rig) -> None:
        """A sidecar process that crashed left the CR of this incarnation with what the main container published
        since: the new process applies that, not DISCOVERY_METADATA."""
        published = {**INITIAL, "custom": {"warm": True}}
        rig.api.on_get(cr(POD.uid, "cr-mine", "30", published)).on_apply(accepted("cr-mine", "31"))
        rig.registrar.apply()
        assert rig.applied_bodies()[0]["spec"]["data"] == published
        assert rig.registrar.registration().data == published

    def test_only_before_the_first_write(self, rig: Rig) -> None:
        """Once this process wrote, a later pass applies the desired data again (the CR is not read back)."""
        rig.api.on_get(NOT_FOUND, cr(POD.uid, "cr-new", "12", {"tampered": True}))
        rig.api.on_apply(accepted("cr-new", "11"), accepted("cr-new", "13"))
        rig.registrar.apply()
        rig.registrar.apply()
        assert [b["spec"]["data"] for b in rig.applied_bodies()] == [INITIAL, INITIAL]

    def test_a_publish_before_the_first_write_wins_over_the_cr(self, rig: Rig) -> None:
        rig.api.on_get(cr(POD.uid, "cr-mine", "30", {**INITIAL, "old": 1})).on_apply(accepted("cr-mine", "31"))
        rig.registrar.publish({**INITIAL, "new": 2}, merge=False)
        assert rig.applied_bodies()[0]["spec"]["data"] == {**INITIAL, "new": 2}

    def test_invalid_leftover_data_is_not_kept(self, rig: Rig) -> None:
        bad = {"endpoints": {"k": {"type": "Endpoint"}}}
        rig.api.on_get(cr(POD.uid, "cr-mine", "30", bad)).on_apply(accepted("cr-mine", "31"))
        rig.registrar.apply()
        assert rig.applied_bodies()[0]["spec"]["data"] == INITIAL


# -- never onto a terminating object (issue 19, item 2) ------------------------------------------------------
def terminating(obj: dict[str, Any], *finalizers: str) -> dict[str, Any]:
    """``obj`` being deleted: a deletionTimestamp, held by ``finalizers``."""
    obj["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    obj["metadata"]["finalizers"] = list(finalizers)
    return obj


class TestTerminating:
    def test_a_terminating_cr_of_another_incarnation_is_waited_out_not_written(self, rig: Rig) -> None:
        """Nothing is deleted (it is being deleted already) or applied onto it; the reason names the object,
        whose it is, and the finalizer that holds it."""
        rig.api.on_get(terminating(cr("uid-pod-old", "cr-old", "7"), "example.com/hold"))
        with pytest.raises(Unavailable) as raised:
            rig.registrar.apply()

        assert rig.api.methods() == ["get"]
        message = str(raised.value)
        assert "DynamoWorkerMetadata ns/worker-0 (uid cr-old, left by another pod incarnation" in message
        assert "held by finalizer(s) example.com/hold" in message
        assert not rig.registrar.registered.is_set()

    def test_a_cr_a_finalizer_keeps_after_the_fencing_delete_is_waited_out(self, rig: Rig) -> None:
        """The fencing delete of a CR with a finalizer only marks it: read again, it is waited out."""
        stale = cr("uid-pod-old", "cr-old", "7")
        rig.api.on_get(stale, pod(POD.uid), terminating(copy.deepcopy(stale), "example.com/hold"))
        rig.api.on_delete({"kind": "DynamoWorkerMetadata"})
        with pytest.raises(Unavailable, match="example.com/hold"):
            rig.registrar.apply()
        assert rig.api.methods() == ["get", "get", "delete", "get"], "no apply onto the terminating object"

    def test_its_own_cr_terminating_is_waited_out_too(self, rig: Rig) -> None:
        rig.api.on_get(terminating(cr(POD.uid, "cr-mine", "7")))
        with pytest.raises(Unavailable, match="this pod's own.*is not gone yet"):
            rig.registrar.apply()
        assert rig.api.methods() == ["get"]

    def test_an_apply_that_lands_on_an_object_being_deleted_is_not_registered(self, rig: Rig) -> None:
        """Deleted between the read and the write: the answer shows it; nothing more is written."""
        rig.api.on_get(NOT_FOUND).on_apply(lambda call: terminating(accepted()(call), "example.com/hold"))
        with pytest.raises(Unavailable, match="example.com/hold"):
            rig.registrar.apply()
        assert not rig.registrar.registered.is_set()

    def test_the_loop_waits_until_the_watch_shows_it_gone_then_creates_the_cr(self, rig: Rig) -> None:
        """Blocked: readiness names the finalizer, the stream is told DEGRADED, publishing is refused as
        unavailable; the watch's DELETED wakes the loop, which checks the Pod (another incarnation's CR was
        there) and applies."""
        held = terminating(cr("uid-pod-old", "cr-old", "7"), "example.com/hold")
        told: list[tuple[bool, str]] = []
        rig.registrar.health.listener = lambda healthy, reason: told.append((healthy, reason))
        rig.api.on_get(held)
        rig.registrar.start()
        wait_for(lambda: told, DEADLINE, interval=0.01, what="blocked, and the stream told")

        (problem,) = rig.registrar.problems()
        assert problem.startswith("not registered: waiting for DynamoWorkerMetadata ns/worker-0 (uid cr-old")
        assert "example.com/hold" in problem
        assert told == [(False, rig.registrar.health.blocking())]
        assert rig.registrar.metrics.registry.get_sample_value("discovery_registration_blocked") == 1
        rig.api.on_get(pod(POD.uid), held)  # the publish: whose is the name, then the CR, still held
        with pytest.raises(Unavailable, match="example.com/hold"):
            rig.registrar.publish(INITIAL, merge=False)

        rig.api.on_get(pod(POD.uid), NOT_FOUND).on_apply(accepted("cr-new", "20"))
        rig.registrar.observe("DELETED", held)  # wakes the loop at once (its poll is 5 s away)
        assert rig.registrar.registered.wait(DEADLINE)
        assert told[-1] == (True, "")
        assert rig.api.calls_of("get")[-2].path == POD_PATH, "the Pod is read before writing the name again"
        assert rig.registrar.problems() == []

    def test_the_watch_showing_its_cr_being_deleted_unregisters_and_wakes_the_loop(self, rig: Rig) -> None:
        rig.register(uid="cr-mine")
        rig.registrar.observe("MODIFIED", terminating(cr(POD.uid, "cr-mine", "12"), "example.com/hold"))
        assert not rig.registrar.registered.is_set()
        assert "example.com/hold" in rig.registrar.problems()[0]
        assert rig.registrar._wake.is_set()


# -- restoring what changed, and only that (issue 19, item 1) ------------------------------------------------
class TestReadBack:
    def test_a_pass_finding_the_cr_as_last_written_writes_nothing(self, rig: Rig) -> None:
        """The resync reads the CR back; unchanged since the last write (same resourceVersion): no apply."""
        rig.register(rv="11")
        rig.api.on_get(cr(POD.uid, "cr-new", "11"))
        rig.registrar.apply()
        assert rig.api.methods() == ["get", "apply", "get"]
        assert rig.registrar.registered.is_set()

    def test_a_change_outside_what_it_writes_writes_nothing(self, rig: Rig) -> None:
        """Another resourceVersion, but its data and labels as written (an annotation, say): nothing to do."""
        rig.register(rv="11")
        current = cr(POD.uid, "cr-new", "12")
        current["metadata"]["labels"] = dict(LABELS)
        rig.api.on_get(current)
        rig.registrar.apply()
        assert rig.api.methods() == ["get", "apply", "get"]

    def test_altered_data_is_lost_and_restored(self, rig: Rig) -> None:
        rig.register(rv="11")
        altered = cr(POD.uid, "cr-new", "12", {"endpoints": {}})
        altered["metadata"]["labels"] = dict(LABELS)
        rig.api.on_get(altered).on_apply(accepted(rv="13"))
        with structlog.testing.capture_logs() as logs:
            rig.registrar.apply()
        assert rig.applied_bodies()[-1]["spec"]["data"] == INITIAL
        assert [(e["event"], e.get("reason")) for e in logs if e["log_level"] != "debug"] == [
            ("registration lost; restoring it", "altered"),
            ("registration restored", "altered"),
        ]

    def test_own_writes_coming_back_through_the_watch_wake_nothing(self, rig: Rig) -> None:
        applied = rig.register(rv="11")
        rig.registrar._wake.clear()
        rig.registrar.observe("MODIFIED", applied)
        same_data_newer = copy.deepcopy(applied)
        same_data_newer["metadata"]["resourceVersion"] = "12"
        rig.registrar.observe("MODIFIED", same_data_newer)
        assert not rig.registrar._wake.is_set()
        other = copy.deepcopy(applied)
        other["metadata"]["resourceVersion"] = "13"
        other["spec"]["data"] = {"changed": True}
        rig.registrar.observe("MODIFIED", other)
        assert rig.registrar._wake.is_set(), "a change it did not write wakes the loop"

    def test_a_relist_wakes_the_loop_only_when_it_shows_something_else(self, rig: Rig) -> None:
        from sidecar.core.resources import parse_worker_metadata

        applied = rig.register(rv="11")
        rig.registrar._wake.clear()
        rig.registrar.relisted(parse_worker_metadata(applied))
        assert not rig.registrar._wake.is_set()
        rig.registrar.relisted(None)
        assert rig.registrar._wake.is_set(), "gone while the watch was down"

    def test_a_cr_missing_on_read_back_is_lost_and_restored(self, rig: Rig) -> None:
        rig.register(rv="11")
        rig.api.on_get(NOT_FOUND).on_apply(accepted("cr-2", "20"))
        with structlog.testing.capture_logs() as logs:
            rig.registrar.apply()
        assert [e.get("reason") for e in logs if e["event"] == "registration lost; restoring it"] == ["missing"]
        assert rig.registrar.registered.is_set()


class TestFailuresAndReadiness:
    def test_a_transient_failure_keeps_the_registration_a_human_one_does_not(self, rig: Rig) -> None:
        """Unreachable after registering: the CR most likely still stands, so it stays registered (readiness
        stays) and one warning says so; forbidden: not registered, an error; back: registered, one info line."""
        rig.register(uid="cr-new", rv="11")
        rig.registrar.resync = 0.01
        refused = ConnectionRefusedError(111, "refused")
        second, third, fourth = threading.Event(), threading.Event(), threading.Event()
        back = cr(POD.uid, "cr-new", "11")
        rig.api.on_get(refused, gated(second, refused), gated(third, FORBIDDEN), gated(fourth, back))
        with structlog.testing.capture_logs() as logs:
            rig.registrar.start()
            rig.api.wait_for_calls("get", 3)  # the second failing pass is under way
            assert rig.registrar.registered.is_set() and rig.registrar.problems() == []
            second.set()
            rig.api.wait_for_calls("get", 4)
            assert rig.registrar.registered.is_set()
            third.set()
            rig.api.wait_for_calls("get", 5)
            assert not rig.registrar.registered.is_set()
            assert "forbidden to register" in rig.registrar.problems()[0]
            rig.registrar.resync = 60  # the next pass after this one is a minute away
            fourth.set()
            assert rig.registrar.registered.wait(DEADLINE)
            wait_for(lambda: any(e["event"] == "registration works again" for e in logs), DEADLINE, 0.01, "back")
        seen = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "debug" and e["event"] != "registered"]
        assert seen == [
            ("registration failing; retrying", "warning"),
            ("registration failed: this needs a human", "error"),
            ("registration works again", "info"),
        ]


class TestStoredForm:
    def test_a_publish_whose_stored_form_dynamo_cannot_decode_is_refused(self, rig: Rig) -> None:
        """An event channel's transport emptied: valid as sent ({}), but server-side apply stores it as null
        for one revision, and Dynamo drops a CR whose event channel has no transport. Refused, nothing sent."""
        channel = {"type": "EventChannel", "namespace": "dynamo", "component": "backend", "topic": "kv",
                   "instance_id": 1, "transport": {"kind": "Nats", "config": {"subject_prefix": "p"}}}
        rig.register(rv="11")
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(accepted(rv="12"))
        rig.registrar.publish({**INITIAL, "event_channels": {"dynamo/backend/kv/1": channel}}, merge=False)
        sent = len(rig.api.calls)
        emptied = {"event_channels": {"dynamo/backend/kv/1": {"transport": {"kind": None, "config": None}}}}
        with pytest.raises(Invalid) as raised:
            rig.registrar.publish(emptied, merge=True)
        message = str(raised.value)
        assert "spec.data.event_channels['dynamo/backend/kv/1'].transport is missing" in message
        assert "stores spec.data.event_channels.dynamo/backend/kv/1.transport as null" in message
        assert len(rig.api.calls) == sent, "nothing sent"
