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

from devcluster.objects import wait_for
from sidecar.config import PodIdentity
from sidecar.kube.api import ApiError
from sidecar.kube.registration import DYNAMO_FIELD_MANAGER, Registrar, Superseded, registration_error, spec_managers
from sidecar.kube.sources import WORKER_METADATA
from sidecar.metrics import Metrics
from sidecar.ports import (
    Forbidden,
    Invalid,
    NotFound,
    NotRegistering,
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


def registered_gauge(registrar: Registrar) -> float | None:
    return registrar.metrics.registry.get_sample_value("discovery_registered")


class Rig:
    def __init__(self) -> None:
        self.api = ScriptedApi()
        self.registrar = Registrar(
            self.api.as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), backoff_max=0.05
        )

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
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), pod(POD.uid)).on_delete({"kind": "Status"})
        rig.api.on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH]
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
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), pod(POD.uid), cr("uid-pod-old", "cr-old", "8"))
        rig.api.on_delete(CONFLICT, {"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "get", "delete", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH], "the Pod is read once a pass"
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
        rig.api.on_get(stale, pod(POD.uid)).on_delete({"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "apply"]

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
        assert rig.registrar.registration() == Registration(True, "11", INITIAL, LABELS)
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
        assert result == Registration(True, "12", document, LABELS)
        assert rig.registrar.registration().data == document

    def test_merge_patch_changes_only_what_it_names(self, rig: Rig) -> None:
        """merge=True: RFC 7386 merge patch onto the current data (null deletes, objects merge, the rest stays)."""
        patch: dict[str, Any] = {
            "endpoints": {"dynamo/backend/generate/2": dynamo_endpoint(2, {})},
            "model_cards": None,
            "extra": 1,
        }
        rig.api.on_get(NOT_FOUND).on_apply(accepted())
        rig.registrar.publish(patch, merge=True)

        assert rig.applied_bodies()[0]["spec"]["data"] == {
            "endpoints": {
                "dynamo/backend/generate/1": dynamo_endpoint(1, {"nats_tcp": "dynamo.backend.generate"}),
                "dynamo/backend/generate/2": dynamo_endpoint(2, {}),
            },
            "event_channels": {},
            "extra": 1,
        }

    def test_successful_publish_returns_the_applied_registration(self, rig: Rig) -> None:
        """The Registration returned carries the resourceVersion and data of the object the API server applied."""
        rig.register(rv="11")
        stored = {"endpoints": {}, "normalised": True}
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(cr(POD.uid, "cr-new", "42", stored))
        result = rig.registrar.publish({"endpoints": {}}, merge=False)

        assert result.registered is True
        assert result.resource_version == "42"
        assert result.data == stored
        assert result.labels == LABELS
        assert rig.registrar.registration().resource_version == "42"

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
        rig.api.on_get(cr(POD.uid, "cr-new", "11")).on_apply(accepted(rv="12"))
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
        assert rig.registrar.problems() == ["not registered"]
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
        rig.api.on_get(pod(POD.uid), foreign).on_delete({"kind": "Status"}).on_apply(accepted("cr-2", "31"))

        rig.registrar.observe("MODIFIED", foreign)
        rig.api.wait_for_calls("apply", 2)

        assert rig.api.methods() == ["get", "apply", "get", "get", "delete", "apply"]
        assert [c.path for c in rig.api.calls_of("get")] == [PATH, POD_PATH, PATH], "the Pod first, once"
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
        rig.api.on_delete({"kind": "Status"})
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
        rig.api.on_delete({"kind": "Status"})
        assert rig.registrar.deregister(timeout=0.05) is False
        assert rig.api.methods().count("apply") == 1


# -- deregistration ----------------------------------------------------------------------------------------
def deregister_async(registrar: Registrar, timeout: float = DEADLINE) -> Future[bool]:
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

    def test_unconfirmed_deletion_returns_false(self, rig: Rig) -> None:
        """Without the DELETED event within the timeout, deregister says it is not confirmed."""
        rig.register()
        rig.api.on_delete({"kind": "Status"})
        assert rig.registrar.deregister(timeout=0.05) is False

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
        rig.api.on_get(cr("uid-pod-old", "cr-old", "7"), PODS_FORBIDDEN, cr("uid-pod-old", "cr-old2", "9"))
        rig.api.on_get(PODS_FORBIDDEN)
        rig.api.on_delete({"kind": "Status"}, {"kind": "Status"}).on_apply(accepted(), accepted())
        with structlog.testing.capture_logs() as logs:
            rig.registrar.apply()
            rig.registrar.apply()

        assert rig.api.methods() == ["get", "get", "delete", "apply"] * 2
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

        rig.api.on_get(cr("uid-pod-other", "cr-other", "7"), pod(POD.uid)).on_delete({"kind": "Status"})
        rig.api.on_apply(accepted())
        rig.registrar.apply()
        assert rig.api.methods()[2:] == ["get", "get", "delete", "apply"]

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
        rig.api.on_get(stale, pod(POD.uid)).on_delete({"kind": "Status"}).on_apply(accepted())
        rig.registrar.apply()
        assert rig.api.methods() == ["get", "get", "delete", "apply"]
        assert not rig.registrar.watch_only

    def test_never_registers_nothing_and_is_ready(self) -> None:
        api = ScriptedApi()
        registrar = Registrar(api.as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), register="never")
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
            Registrar(ScriptedApi().as_kube_api(), POD, LABELS, INITIAL, FIELD_MANAGER, Metrics(), register="maybe")


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
