"""This pod's own ``DynamoWorkerMetadata``: apply it, keep it, fence stale ones, and withdraw it.

* The CR is named after the pod, owned by the Pod (name + UID, ``controller: true``,
  ``blockOwnerDeletion: false``, as Dynamo writes it) so garbage collection removes it with the pod,
  and written with server-side apply under one field manager.
* Fencing at start-up: a CR left by an earlier incarnation of this pod name (another UID) is deleted
  and re-created, never adopted; the delete carries preconditions (that object's UID and
  resourceVersion) so that, racing another writer, it can only ever remove the stale object it saw.
* Before fencing, and whenever the watch shows the CR of this pod's name owned by another UID (or its
  own CR deleted from under it, which is what the new incarnation's fencing does), the publisher reads
  its own Pod: when the Pod of its name is gone or has another UID, *this* incarnation
  is the stale one (force-deleted while its sidecar still runs, and replaced). It is then
  ``superseded``: it stops writing for good (no apply, no fencing delete, no deregistering delete; the
  CR belongs to the new pod) and says so in ``problems()``, which fails readiness. Without ``get`` on
  pods the check cannot be made: a hint is logged once and fencing goes on as before.
* The publisher follows its own CR through a watch of that one object, which runs whatever
  ``DISCOVERY_WATCH`` says (``sidecar.kube.own_registration``): deleted from under it (or taken over by
  another owner, or altered), it is restored at once, and the log and metrics say so (the loop's
  ``health``); listing owners besides this pod (an ownerReference merged in by someone else), the extra
  owners are removed with a merge patch guarded by the resourceVersion read. Server-side apply cannot
  do it: entries another field manager added stay theirs, and with them in place the admission policy
  refuses the apply. Keys another writer added to ``spec.data`` go the same way, so peers read exactly
  what this pod published.
* Never onto a terminating object: a CR of this name with a ``deletionTimestamp`` (a finalizer holds it)
  is waited out, never written: applying onto it would make the new data, and the new owner, vanish with
  it when the finalizer is lifted. The pass raises ``Terminating`` (a ``Blocked``): until the object is
  gone the loop is ``BLOCKED``, ``problems()`` names the object and its finalizers (readiness fails), the
  stream says DEGRADED for this pod's registration, and publishing is refused as unavailable; the CR is
  re-created as soon as the watch shows the old one gone.
* Between events, a resync every ``resync`` seconds (60 by default) reads the CR and writes only when it
  changed since this sidecar's last write.
* Deregistration (SIGTERM) deletes the CR, again only this incarnation's (UID precondition), and waits
  until the deletion has come back through the own watch (when it follows the CR): then peers watching
  the API server see it too; otherwise one GET confirms it.
* It never fights another writer of the same CR. When Dynamo's own runtime in the main container
  (field manager ``dynamo-worker``) manages this pod's CR, found before the first write or at any time
  through the watch, the publisher goes *watch-only*: it writes nothing more (no apply, no delete at
  SIGTERM: Dynamo keeps its CR and garbage collection removes it with the pod), refuses
  ``PublishMetadata`` with the reason, and says so in the log and ``/readyz``'s body. The peers are
  still served. ``DISCOVERY_REGISTER=never`` selects watch-only from the start.
* A sidecar restarted while its pod lives on (a crash, an OOM kill) finds the CR of this incarnation
  with what the main container published since start-up, and keeps that data rather than rolling it
  back to ``DISCOVERY_METADATA`` (the Python client also re-publishes after a reconnect, which covers
  a graceful restart, whose deregistration deleted the CR).

The thread, the state (``sidecar.peers.publisher_loop.PublisherState``: unregistered, registered,
blocked, watch-only, superseded, deregistering), backoff, the failure rule, the health reports and the
one publish path are the ``PublisherLoop``'s; what is written, and how, is this module's. To the
pod-facing API this is a ``Publisher``: ``publish`` raises the ``sidecar.peers.ports`` errors with a
meaning (forbidden, invalid, not found, unavailable, blocked), never a Kubernetes client exception.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

import structlog

from sidecar.core.containers import pod_peer_key
from sidecar.core.dynamo_schema import dynamo_metadata_problem
from sidecar.core.instance_id import instance_id
from sidecar.core.merge_patch import removal_patch
from sidecar.core.records import MetadataRecord
from sidecar.core.resources import validate_worker_data, with_empty_maps
from sidecar.core.server_side_apply import emptied_paths, emptied_to_null, intermediate_form
from sidecar.kube.api import CONNECTION_ERRORS, ApiError, KubeApi, ResourcePath
from sidecar.kube.sources import WORKER_METADATA
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    Blocked,
    Forbidden,
    Invalid,
    NotFound,
    NotRegistering,
    PodIdentity,
    RegisterMode,
    Registration,
    RegistrationError,
    TooLarge,
    Unavailable,
)
from sidecar.peers.publisher_loop import RESYNC_SECONDS, PublisherLoop, PublisherState
from sidecar.peers.registration_health import HealthListener

API_VERSION = "nvidia.com/v1alpha1"
KIND = "DynamoWorkerMetadata"
PODS = ResourcePath("", "v1", "pods")
DYNAMO_FIELD_MANAGER = "dynamo-worker"
"""The field manager Dynamo's runtime (1.6.1) applies its ``DynamoWorkerMetadata`` under."""
REGISTER_MODES = tuple(mode.value for mode in RegisterMode)


class Superseded(Forbidden):
    """This pod incarnation no longer exists (its Pod was deleted, or replaced under the same name by one
    with another UID): the sidecar stopped writing, and nothing it could retry will change that."""


class Terminating(Blocked):
    """The CR of this pod's name is being deleted (it has a ``deletionTimestamp``; a finalizer holds it):
    nothing may be written onto it, the registration is re-created once it is gone. ``str()`` names the
    object and its finalizers."""


def terminating_reason(obj: Mapping[str, Any], identity: PodIdentity) -> str:
    """Why the registration waits: the object, whose it is, and the finalizers that hold it."""
    meta = obj.get("metadata") or {}
    finalizers = [str(f) for f in meta.get("finalizers") or ()]
    whose = (
        "this pod's own"
        if owned_by(obj, identity)
        else "left by another pod incarnation ("
        + ", ".join(f"{n} uid {u}" for _, n, u in other_owners(obj, identity))
        + ")"
        if meta.get("ownerReferences")
        else "owned by nobody"
    )
    held = f"held by finalizer(s) {', '.join(finalizers)}" if finalizers else "not gone yet"
    return (
        f"waiting for DynamoWorkerMetadata {meta.get('namespace', '')}/{meta.get('name', '')} (uid "
        f"{meta.get('uid', '')}, {whose}) to finish deleting: it has a deletionTimestamp and is {held}; this pod's "
        "registration is re-created as soon as it is gone"
    )


def is_terminating(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid", ""))


def stored_form_problem(before: Mapping[str, Any], sent: Mapping[str, Any]) -> str | None:
    """Why Dynamo could not decode the revision server-side apply stores for ``sent`` (after ``before``),
    when that differs from ``sent``: an object this pod emptied is null there (``intermediate_form``)."""
    stored = intermediate_form(dict(before), dict(sent))
    if stored == sent:
        return None
    problem = dynamo_metadata_problem(stored)
    if problem is None:
        return None
    nulls = ", ".join(emptied_paths(dict(before), dict(sent)))
    return (
        f"{problem}: server-side apply stores {nulls} as null when an object that had members is emptied, and Dynamo "
        "drops a CR it cannot decode; publish a value Dynamo accepts there (or remove the entry)"
    )


def registration_error(exc: Exception, action: str, reach: str = "") -> RegistrationError:
    """The meaning of a failed request (an ``ApiError`` or a connection error), with an operator's sentence;
    the Kubernetes twin of ``sidecar.etcd.publisher.registration_error``, with the same contract. What needs
    a human is every meaning but ``Unavailable`` (400, 401, 403, 404, 413, 422).

    ``reach``: what the sentence says could not be done when the API server is unreachable (``action``)."""
    if not isinstance(exc, ApiError):
        return Unavailable(f"cannot reach the API server to {reach or action}: {type(exc).__name__}")
    message = explain(exc, action)
    if exc.status in (401, 403):
        return Forbidden(message)
    if exc.status == 404:
        return NotFound(message)
    if exc.status == 413:
        return TooLarge(message)
    if exc.status in (400, 422):
        return Invalid(message)
    return Unavailable(message)


def explain(exc: ApiError, action: str) -> str:
    """Turn an API error into an operator-facing sentence."""
    if exc.status == 403:
        return (
            f"forbidden to {action} ({exc.message}); grant the pod's service account the Role in "
            "manifests/rbac.yaml and, with the admission policy, run the sidecar under a pod-bound token"
        )
    if exc.status == 401:
        return (
            f"the API server rejected the credentials trying to {action} ({exc.message}); a pod-bound token "
            "stops working once its pod is deleted or replaced by a pod of the same name with another UID"
        )
    if exc.status == 404 and "could not find the requested resource" in exc.message:
        return (
            f"cannot {action}: the DynamoWorkerMetadata CRD is not installed (install the chart "
            "charts/discovery-sidecar, or kubectl apply -f manifests/components/crd/crd.yaml)"
        )
    if exc.status == 422:
        return f"the API server rejected the CR while trying to {action}: {exc.message}"
    return f"cannot {action}: {exc}"


def _is_pod(ref: Mapping[str, Any], identity: PodIdentity) -> bool:
    return ref.get("kind") == "Pod" and ref.get("uid") == identity.uid and ref.get("name") == identity.name


def owned_by(obj: Mapping[str, Any], identity: PodIdentity) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return any(_is_pod(r, identity) for r in refs)


def spec_managers(obj: Mapping[str, Any]) -> set[str]:
    """The field managers that own some of the object's ``spec`` (from ``metadata.managedFields``)."""
    entries = (obj.get("metadata") or {}).get("managedFields") or ()
    return {
        str(e.get("manager", ""))
        for e in entries
        if isinstance(e, Mapping) and isinstance(e.get("fieldsV1"), Mapping) and "f:spec" in e["fieldsV1"]
    }


def other_owners(obj: Mapping[str, Any], identity: PodIdentity) -> list[tuple[str, str, str]]:
    """(kind, name, uid) of every owner reference that is not this pod incarnation."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return [(r.get("kind", ""), r.get("name", ""), r.get("uid", "")) for r in refs if not _is_pod(r, identity)]


class KubePublisher(PublisherLoop):
    """Owns this pod's CR: what was last applied and observed, and how it is applied, fenced, followed and
    withdrawn (the loop, the state, the health and the desired data are the ``PublisherLoop``'s).

    The Kubernetes backend builds it and the daemon starts and deregisters it; the watch of its own CR
    (``sidecar.kube.own_registration``) calls ``observe`` (each event) and ``relisted`` (each list); the
    gRPC layer calls ``registration`` and ``publish`` (as a ``Publisher``) from its threads.
    ``_state_lock`` (the loop's) also guards ``_applied``, ``_observed``, ``_adopt`` and ``_conflict``.
    """

    thread_name = "kube-publisher"

    def __init__(
        self,
        api: KubeApi,
        identity: PodIdentity,
        labels: Mapping[str, str],
        initial_data: Mapping[str, Any],
        field_manager: str,
        metrics: Metrics,
        backoff_max: float = 30.0,
        register: str = RegisterMode.AUTO,
        metadata_name: str = "",
        resync: float = RESYNC_SECONDS,
        health_listener: HealthListener | None = None,
    ) -> None:
        if register not in REGISTER_MODES:
            raise ValueError(f"register must be one of {REGISTER_MODES}, got {register!r}")
        super().__init__(
            initial_data,
            metrics=metrics,
            backoff_max=backoff_max,
            register=register,
            log=structlog.get_logger("sidecar.registration").bind(pod=identity.name),
            watch_only_reason="watch-only (DISCOVERY_REGISTER=never): this sidecar does not write the pod's "
            "DynamoWorkerMetadata",
            resync=resync,
            health_listener=health_listener,
        )
        self.metrics: Metrics = metrics
        self.api = api
        self.identity = identity
        self.labels = dict(labels)
        self.field_manager = field_manager
        # The CR's name: the pod's, or {pod}-{container} in Dynamo's container mode. Owner references, the
        # incarnation check and the admission policy are still about the pod.
        self.metadata_name = metadata_name or identity.name
        self.path = WORKER_METADATA.resource.item(identity.namespace, self.metadata_name)
        self.pod_path = PODS.item(identity.namespace, identity.name)
        self._applied: dict[str, Any] | None = None  # the CR as last written (or read back as written)
        self._observed: Mapping[str, Any] | None = None  # our CR as the watch last showed it (watch-only reads it)
        # Until the first apply (or a publish): keep the data of a CR of this incarnation found at start-up.
        self._adopt = True
        # The watch showed the CR of our name owned by another UID, or ours deleted by someone else: read the
        # Pod before writing again (``check_incarnation``).
        self._conflict = False
        self._pods_hint_logged = False
        self._registered_logged = False  # "registered" is logged once; later losses and restores by health
        self._gone = threading.Event()  # our CR's deletion came back through the watch

    # -- the desired object ---------------------------------------------------------------------------
    def owner_references(self) -> list[dict[str, Any]]:
        """This pod incarnation as the one owner, as Dynamo writes it (and as the admission policy demands)."""
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.identity.name,
                "uid": self.identity.uid,
                "controller": True,  # as Dynamo 1.6.1 writes it for a pod-named CR
                "blockOwnerDeletion": False,
            }
        ]

    def desired(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": self.metadata_name,
                "namespace": self.identity.namespace,
                "labels": dict(self.labels),
                "ownerReferences": self.owner_references(),
            },
            "spec": {"data": self.data()},
        }

    def registration(self) -> Registration:
        """This pod's registration as stored: what ``GetSelf`` reports.

        The data is the stored object's (``with_empty_maps``, as peers read it) once the sidecar has written
        it, so ``GetSelf``, the ``PublishMetadata`` reply and every peer read the same document; before the
        first write it is the data about to be written.
        """
        with self._state_lock:
            watch_only = self._state is PublisherState.WATCH_ONLY
            applied = (self._observed if watch_only else self._applied) or {}
            stored = (applied.get("spec") or {}).get("data")
            data = with_empty_maps(copy.deepcopy(stored if isinstance(stored, Mapping) and applied else self._data))
        if watch_only:  # the CR as its writer left it, when it is this incarnation's
            return Registration(
                registered=bool(applied),
                resource_version=(applied.get("metadata") or {}).get("resourceVersion", ""),
                data=data if applied else {},
                labels=dict((applied.get("metadata") or {}).get("labels") or {}),
                **self._instance(),
            )
        return Registration(
            registered=self.registered.is_set(),
            resource_version=(applied.get("metadata") or {}).get("resourceVersion", ""),
            data=data,
            labels=dict(self.labels),
            **self._instance(),
        )

    def _instance(self) -> dict[str, Any]:
        """Who this pod (or container) is to peers: the CR's name, its peer key, and Dynamo's instance ID
        (the SipHash of that name), which never change while the pod incarnation lives."""
        return {
            "name": self.metadata_name,
            "peer_uid": pod_peer_key(self.identity.uid, self.identity.name, self.metadata_name),
            "instance_id": instance_id(self.metadata_name),
        }

    def _go_watch_only(self, manager: str) -> NotRegistering:
        """Stop writing for good: ``manager`` manages this pod's CR. Returns the error publishing raises."""
        message = (
            f"watch-only: this pod's DynamoWorkerMetadata is managed by {manager!r} (Dynamo's runtime in the main "
            "container), so this sidecar writes nothing and serves peers only; publish through Dynamo's runtime"
        )
        first = not self.watch_only
        reason = self._enter(PublisherState.WATCH_ONLY, message)
        if first and reason == message:
            self.log.warning("another writer manages this pod's CR: watch-only from now on", manager=manager)
        return NotRegistering(reason)

    def _yield_to(self, obj: Mapping[str, Any]) -> str | None:
        """The writer this sidecar must leave the CR to, if one manages it (Dynamo's runtime), else None."""
        return (
            DYNAMO_FIELD_MANAGER
            if DYNAMO_FIELD_MANAGER in spec_managers(obj) and owned_by(obj, self.identity)
            else None
        )

    # -- is this incarnation still the pod? -------------------------------------------------------------
    def check_incarnation(self) -> None:
        """Raise ``Superseded`` when the Pod of this name is gone or is another incarnation (another UID).

        One GET of the Pod, made only on an ownership conflict (before a fencing delete, and after the watch
        showed the CR of this name owned by another UID or deleted by someone else), so it costs nothing in
        the steady state.
        Forbidden (the Role lacks ``get`` on pods) is logged once and the caller carries on as if the Pod
        were ours, as before the check existed; any other failure is raised, so that nothing is deleted
        while it is not known whose the name is.
        """
        try:
            pod = self.api.get(self.pod_path)
        except ApiError as exc:
            if exc.status == 404:
                self._supersede(f"pod {self.identity.name} was deleted")
            if exc.status == 403:
                if not self._pods_hint_logged:
                    self._pods_hint_logged = True
                    self.log.warning(
                        "cannot tell whether this pod incarnation still exists",
                        reason=explain(exc, "get this pod"),
                        hint="grant get on pods (manifests/rbac.yaml): without it, the sidecar of a pod that was "
                        "force-deleted and replaced under the same name keeps writing and fights the new one",
                    )
                return
            raise
        uid = (pod.get("metadata") or {}).get("uid", "")
        if uid != self.identity.uid:
            self._supersede(f"pod {self.identity.name} is now uid {uid}")

    def _supersede(self, what: str) -> NoReturn:
        message = (
            f"this pod incarnation (uid {self.identity.uid}) no longer exists: {what} — the sidecar stopped writing"
        )
        first = not self.superseded
        message = self._enter(PublisherState.SUPERSEDED, message) or message
        self._mark_unregistered()
        if first:
            self.log.error("pod incarnation superseded: the sidecar stopped writing", reason=message)
        raise Superseded(message)

    def _superseded_error(self, reason: str) -> RegistrationError:
        return Superseded(reason)

    def _take_conflict(self) -> bool:
        with self._state_lock:
            conflict, self._conflict = self._conflict, False
        return conflict

    def _check_conflict(self) -> bool:
        """Check the Pod if the watch reported an ownership conflict since the last check; True if checked."""
        if not self._take_conflict():
            return False
        try:
            self.check_incarnation()
        except Superseded:
            raise
        except BaseException:
            with self._state_lock:
                self._conflict = True  # still unanswered: the next pass asks again
            raise
        return True

    # -- one pass ---------------------------------------------------------------------------------------
    def fence(self) -> dict[str, Any] | None:
        """Leave the CR of this pod's name absent, or ours with no other owner; never adopt another's.

        A CR owned by another incarnation is deleted (preconditioned on the UID and resourceVersion read),
        once ``check_incarnation`` has confirmed that this incarnation is still the pod, and read again: a
        finalizer may keep it. A CR being deleted, whoever's it is, raises ``Terminating``: it is waited
        out, never written onto (nor adopted). A CR of ours that lists other owners too loses them (a merge
        patch preconditioned on the resourceVersion read). Returns this incarnation's CR as read (None when
        there is none now).
        """
        checked = self._check_conflict()
        while True:
            try:
                current = self.api.get(self.path)
            except ApiError as exc:
                if exc.status == 404 and "could not find the requested resource" not in exc.message:
                    return None
                raise
            meta = current["metadata"]
            if is_terminating(current):
                if not owned_by(current, self.identity):
                    with self._state_lock:
                        self._conflict = True  # once it is gone: is this incarnation still the pod?
                raise Terminating(terminating_reason(current, self.identity))
            if owned_by(current, self.identity):
                extra = other_owners(current, self.identity)
                if not extra or self._yield_to(current):
                    return current  # (another writer's extra owners are that writer's business)
                self.log.warning("removing owners this pod did not put on its CR", owners=extra)
                try:
                    return self.api.merge_patch(
                        self.path,
                        {
                            "metadata": {
                                "resourceVersion": meta["resourceVersion"],
                                "ownerReferences": self.owner_references(),
                            }
                        },
                    )
                except ApiError as exc:
                    if exc.status == 404:
                        return None
                    if exc.status != 409:  # 409: it changed since we read it; look again
                        raise
                    continue
            if not checked:
                self.check_incarnation()
                checked = True
            owners = [(r.get("name"), r.get("uid")) for r in meta.get("ownerReferences") or ()]
            self.log.info("replacing a CR left by another pod incarnation", stale_uid=meta.get("uid"), owners=owners)
            try:
                self.api.delete(
                    self.path,
                    {
                        "apiVersion": "v1",
                        "kind": "DeleteOptions",
                        "preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                    },
                )
            except ApiError as exc:
                if exc.status == 404:
                    return None
                if exc.status != 409:  # 409: it changed since we read it; look again
                    raise
            # Read it again: gone, or (a finalizer holds it) only marked for deletion, which is waited out.

    def apply(self, force: bool = False) -> dict[str, Any]:
        """Fence, then server-side apply the desired CR (unless it is in place as last written, and not
        ``force``). Raises ``ApiError``, a connection error, ``Terminating`` (the CR of this name is being
        deleted), ``Superseded`` (this incarnation no longer exists), ``NotRegistering`` (watch-only) or
        ``Unavailable`` (deregistering)."""
        with self._apply_lock:
            return self._apply_locked(force)

    def _apply_locked(self, force: bool) -> dict[str, Any]:
        # Nothing is written unless the state writes: superseded (the CR of this name is the new
        # incarnation's), deregistering (nothing may re-create the CR) or watch-only.
        self._check_writes()
        try:
            current = self.fence()
        except Terminating:
            self._mark_unregistered()
            raise
        with self._state_lock:
            last = self._applied
        if current is not None:
            manager = self._yield_to(current)
            if manager:
                with self._state_lock:
                    self._observed = current
                error = self._go_watch_only(manager)
                self._mark_registered()  # its writer's registration stands
                raise error
            self._adopt_published(current)
            if last is not None and not force:
                altered = self._alteration(current, last)
                if not altered:  # as this sidecar left it (or changed outside what it writes): nothing to do
                    return self._in_place(current)
                self.health.lost("altered", f"its {altered} changed behind the sidecar's back", uid=_uid(current))
        elif last is not None and self.registered.is_set():
            # Gone, and no watch event said so (a relist, or the resync): as good as deleted.
            self._mark_unregistered()
            self.health.lost("missing", "the CR was not found when read back", uid=_uid(last))
        applied = self._server_side_apply(self.desired())
        if is_terminating(applied):  # deleted between the read and the write: wait it out, write nothing more
            self._mark_unregistered()
            raise Terminating(terminating_reason(applied, self.identity))
        with self._state_lock:
            self._adopt = False
        return self._in_place(applied)

    def _server_side_apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply ``body`` so that the stored ``spec.data`` is exactly what it says, and return the stored CR.

        Server-side apply stores an object this manager emptied as null (``sidecar.core.server_side_apply``),
        and keeps keys another manager added; the first is undone by applying once more, the second by a
        merge patch that removes those keys, guarded by the resourceVersion just written.
        """
        sent = body["spec"]["data"]
        applied = self.api.apply(self.path, body, self.field_manager)
        stored = (applied.get("spec") or {}).get("data")
        foreign = removal_patch(stored, sent)
        if foreign is not None and not is_terminating(applied):
            self.log.warning("removing keys another writer added to this pod's spec.data", keys=sorted(foreign))
            try:
                applied = self.api.merge_patch(
                    self.path,
                    {"metadata": {"resourceVersion": _rv(applied)}, "spec": {"data": foreign}},
                )
            except ApiError as exc:
                if exc.status != 409:  # 409: changed again since; the watch event brings the loop back
                    raise
            stored = (applied.get("spec") or {}).get("data")
        if emptied_to_null(stored, sent) and not is_terminating(applied):
            applied = self.api.apply(self.path, body, self.field_manager)  # emptied objects: stored as sent now
        return applied

    def _alteration(self, current: Mapping[str, Any], last: Mapping[str, Any]) -> str:
        """What of this sidecar's own writing ``current`` no longer says ("" when nothing): its data, its labels."""
        if _rv(current) == _rv(last):
            return ""
        changed = []
        if (current.get("spec") or {}).get("data") != (last.get("spec") or {}).get("data"):
            changed.append("spec.data")
        labels = (current.get("metadata") or {}).get("labels") or {}
        if any(labels.get(key) != value for key, value in self.labels.items()):
            changed.append("labels")
        return " and ".join(changed)

    def _in_place(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` is this pod's CR, written or read back as this sidecar wants it: registered."""
        with self._state_lock:
            self._applied = obj
        self._gone.clear()
        self._mark_registered(resource_version=_rv(obj))
        return obj

    def _adopt_published(self, current: Mapping[str, Any]) -> None:
        """Before this process's first write: keep what this incarnation's CR already says.

        The CR is this pod incarnation's, so its data is what the main container published through an
        earlier sidecar process (one that crashed: a graceful stop deletes the CR). Re-applying
        ``DISCOVERY_METADATA`` over it would silently roll that back. Data that is no longer valid is not
        kept (the initial data is applied instead, and the reason logged).
        """
        with self._state_lock:
            if not self._adopt:
                return
            self._adopt = False
            desired = self._data
        existing = (current.get("spec") or {}).get("data")
        if not isinstance(existing, Mapping) or existing == desired:
            return
        problem = validate_worker_data(existing) or dynamo_metadata_problem(existing)
        if problem:
            self.log.warning("not keeping the CR's data from before the restart: it is invalid", reason=problem)
            return
        with self._state_lock:
            self._data = copy.deepcopy(dict(existing))
        self.log.info(
            "kept the metadata this pod published before the sidecar restarted",
            resource_version=(current.get("metadata") or {}).get("resourceVersion", ""),
        )

    # -- the PublisherLoop's hooks ---------------------------------------------------------------------------
    def _refusal(self, previous: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
        """What this pod publishes must be readable by Dynamo, and so must the revision server-side apply
        stores on the way to it (an object this pod emptied is null there)."""
        return dynamo_metadata_problem(new) or stored_form_problem(previous, new)

    def _accepted(self) -> None:
        with self._state_lock:
            self._adopt = False  # what the main container publishes now wins over what the CR held

    def _write(self, data: Mapping[str, Any]) -> Registration:
        """Apply now (``data`` is the desired data already); the reply is the stored CR's data, read as peers
        read it."""
        try:
            applied = self._apply_locked(force=True)
        except (ApiError, *CONNECTION_ERRORS) as exc:
            code = str(exc.status) if isinstance(exc, ApiError) else "connection"
            self.metrics.api_errors.labels("publish", code).inc()
            raise registration_error(exc, "publish metadata") from exc
        stored = (applied.get("spec") or {}).get("data")
        return Registration(
            registered=True,
            resource_version=applied["metadata"]["resourceVersion"],
            data=with_empty_maps(copy.deepcopy(stored if isinstance(stored, Mapping) else {})),
            labels=dict(self.labels),
            **self._instance(),
        )

    def _establish(self) -> None:
        try:
            cr = self.apply()
        except (ApiError, *CONNECTION_ERRORS) as exc:
            code = str(exc.status) if isinstance(exc, ApiError) else "connection"
            self.metrics.api_errors.labels("register", code).inc()
            raise registration_error(exc, "register this pod's DynamoWorkerMetadata", reach="register") from exc
        if not self._registered_logged:
            self._registered_logged = True
            self.log.info("registered", resource_version=_rv(cr))

    def _hold(self) -> None:
        self._sleep(self.resync)  # until the own watch shows a change to our CR, or the resync is due

    # -- following its own CR (the own watch: ``sidecar.kube.own_registration``) ----------------------------
    def observe(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Observer of the own-CR watch: react to each change of this pod's CR at once.

        Deleted, being deleted, taken over by another owner, given other owners, or altered (its data or its
        labels are not what this sidecar wrote): the loop is woken to restore it (being deleted: to wait it
        out), and ``health`` says it was lost. Events of this sidecar's own writes change nothing.
        """
        meta = obj.get("metadata") or {}
        if meta.get("name") != self.metadata_name or meta.get("namespace") != self.identity.namespace:
            return
        state = self.state
        if state is PublisherState.SUPERSEDED:
            return  # the CR of this name is the new incarnation's: nothing here is ours to react to
        deregistering = state is PublisherState.DEREGISTERING
        ours = owned_by(obj, self.identity)
        terminating = is_terminating(obj)
        live = kind != "DELETED" and not terminating
        with self._state_lock:
            self._observed = obj if ours and live else None
        manager = self._yield_to(obj) if live else None
        if manager and not deregistering:
            self._go_watch_only(manager)
        if self.watch_only:
            # Another writer's CR: follow it for GetSelf and readiness, never write it.
            (self._mark_registered if ours and live else self._mark_unregistered)()
            return
        if kind == "DELETED":
            if not ours:
                if state is PublisherState.BLOCKED:
                    self._wake.set()  # the terminating CR the loop waits out is gone: create ours now
                return  # another incarnation's CR (fencing removed it): not ours to re-create or confirm
            applied_uid = self._applied_uid()
            if applied_uid and meta.get("uid") != applied_uid:
                return  # an older object of ours, not the one this sidecar holds
            self._gone.set()
            if not deregistering and not self._stop.is_set():
                # Deleted by someone else: an admin, or a newer incarnation of this pod fencing. The loop reads
                # the Pod before re-creating the CR, so a replaced incarnation never writes it again.
                self._lose("deleted", "it was deleted", obj, conflict=True)
        elif deregistering:
            return
        elif terminating:
            # Being deleted (a finalizer holds it): the loop waits until it is gone, then re-creates it.
            self._lose("terminating", terminating_reason(obj, self.identity), obj, conflict=not ours)
        elif not ours:
            # Taken over by another owner: a newer incarnation of this pod, if this one was replaced. The loop
            # checks the Pod (``check_incarnation``) before it writes anything again.
            owners = ", ".join(f"{kind_} {name} uid {uid}" for kind_, name, uid in other_owners(obj, self.identity))
            self._lose("taken_over", f"it belongs to another owner ({owners}), not this pod incarnation", obj, True)
        elif extra := other_owners(obj, self.identity):
            owners = ", ".join(f"{kind_} {name} uid {uid}" for kind_, name, uid in extra)
            self.health.lost("altered", f"it lists other owners too ({owners}); removing them", uid=_uid(obj))
            self._wake.set()
        else:
            with self._state_lock:
                last = self._applied
                desired = self._data
            data = (obj.get("spec") or {}).get("data")
            if last is not None and self._alteration(obj, last) and data != desired:
                self._wake.set()  # the loop reads it back and restores what changed (events of own writes: no-op)

    def _lose(self, reason: str, detail: str, obj: Mapping[str, Any], conflict: bool) -> None:
        """The CR is gone or not ours as it stands: not registered (readiness says why), restore it now."""
        if conflict:
            with self._state_lock:
                self._conflict = True
        self._mark_unregistered(f"its DynamoWorkerMetadata {self.identity.namespace}/{self.metadata_name}: {detail}")
        self.health.lost(reason, detail, uid=_uid(obj))
        self._wake.set()

    def relisted(self, found: MetadataRecord | None) -> None:
        """What a (re)list of the own-CR watch found: a CR deleted or changed while the watch was down shows
        only here. Anything but the CR as this sidecar last wrote it wakes the loop, which reads it back."""
        with self._state_lock:
            last = self._applied
            watch_only = self._state is PublisherState.WATCH_ONLY
            observed = self._observed
        if watch_only:
            owned = found is not None and self.identity.uid in found.owner_pod_uids
            if not owned:
                with self._state_lock:
                    self._observed = None
                self._mark_unregistered()
            elif observed is None or found is None or _rv(observed) != found.resource_version:
                self._read_back_watch_only()
            return
        if last is None or found is None or found.resource_version != _rv(last):
            self._wake.set()

    def _read_back_watch_only(self) -> None:
        """Watch-only, after a relist showed the CR changed: read it (for GetSelf) and follow it as an event."""
        try:
            obj = self.api.get(self.path)
        except (ApiError, *CONNECTION_ERRORS) as exc:
            self.log.debug("cannot read this pod's CR back after a relist", error=str(exc))
            return
        self.observe("MODIFIED", obj)

    # -- withdrawing it -----------------------------------------------------------------------------------
    def _withdraw(self, timeout: float) -> bool:
        """Delete this incarnation's CR and wait until the own watch saw it go (when it follows the CR; else,
        or when it missed the event within ``timeout``, one GET says). True when confirmed.

        A superseded incarnation deletes nothing (the CR of its name is the new pod's) and returns True.
        """
        with self._apply_lock:  # an apply under way finishes first; none starts after (the state says so)
            applied_uid = self._applied_uid()
            try:
                self._check_conflict()  # the watch saw the CR of this name owned by another UID: whose is it?
            except Superseded:
                pass
            except (ApiError, *CONNECTION_ERRORS) as exc:
                self.log.warning("cannot check this pod incarnation before deregistering", error=str(exc))
        self._mark_unregistered()
        if self.superseded:
            self.log.info("not deregistering: this pod incarnation was superseded, the CR is the new pod's")
            return True
        try:
            self.api.delete(
                self.path,
                {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": applied_uid}}
                if applied_uid
                else None,
            )
        except ApiError as exc:
            if exc.status == 404:
                return True
            if exc.status == 409:
                self.log.info("own CR already replaced by a newer incarnation; leaving it")
                return True
            self.log.error("deregistration failed", reason=explain(exc, "delete this pod's DynamoWorkerMetadata"))
            return False
        except CONNECTION_ERRORS as exc:
            # Transient: the CR goes with the pod (garbage collection), and readiness has already failed.
            self.log.warning("deregistration failed: API server unreachable", error=type(exc).__name__)
            return False
        if self.own_watch_healthy and self._gone.wait(timeout):
            self.log.info("deregistered", confirmed_by_watch=True)
            return True
        # No watch shows it (it is down, or missed the event within the budget): one GET says.
        confirmed = self._confirm_gone()
        self.log.info("deregistered", confirmed_by_get=confirmed)
        return confirmed

    def _confirm_gone(self) -> bool:
        """Without a watch of this CR: one GET says whether this incarnation's CR is gone."""
        try:
            current = self.api.get(self.path)
        except ApiError as exc:
            return exc.status == 404
        except CONNECTION_ERRORS:
            return False
        return not owned_by(current, self.identity)

    def _applied_uid(self) -> str:
        with self._state_lock:
            uid: str = ((self._applied or {}).get("metadata") or {}).get("uid", "")
        return uid
