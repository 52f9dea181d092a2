"""This pod's own ``DynamoWorkerMetadata``: apply it, keep it, fence stale ones, and withdraw it.

* The CR is named after the pod, owned by the Pod (name + UID, ``controller: true``,
  ``blockOwnerDeletion: false``, as Dynamo writes it) so garbage collection removes it with the pod,
  and written with server-side apply under one field manager.
* Fencing at start-up: a CR left by an earlier incarnation of this pod name (another UID) is deleted
  and re-created, never adopted; the delete carries preconditions (that object's UID and
  resourceVersion) so that, racing another writer, it can only ever remove the stale object it saw.
* Before fencing, and whenever the watch shows the CR of this pod's name owned by another UID (or its
  own CR deleted from under it, which is what the new incarnation's fencing does), the registrar reads
  its own Pod: when the Pod of its name is gone or has another UID, *this* incarnation
  is the stale one (force-deleted while its sidecar still runs, and replaced). It is then
  ``superseded``: it stops writing for good (no apply, no fencing delete, no deregistering delete; the
  CR belongs to the new pod) and says so in ``problems()``, which fails readiness. Without ``get`` on
  pods the check cannot be made: a hint is logged once and fencing goes on as before.
* The registrar follows its own CR through the metadata watch: deleted from under it (or taken over
  by another owner), it is re-applied; listing owners besides this pod (an ownerReference merged in by
  someone else), the extra owners are removed with a merge patch guarded by the resourceVersion read.
  Server-side apply cannot do it: entries another field manager added stay theirs, and with them in
  place the admission policy refuses the apply.
* Deregistration (SIGTERM) deletes the CR, again only this incarnation's (UID precondition), and waits
  until the deletion has come back through the watch: then peers watching the API server see it too.
* It never fights another writer of the same CR. When Dynamo's own runtime in the main container
  (field manager ``dynamo-worker``) manages this pod's CR, found before the first write or at any time
  through the watch, the registrar goes *watch-only*: it writes nothing more (no apply, no delete at
  SIGTERM: Dynamo keeps its CR and garbage collection removes it with the pod), refuses
  ``PublishMetadata`` with the reason, and says so in the log and ``/readyz``'s body. The peers are
  still served. ``DISCOVERY_REGISTER=never`` selects watch-only from the start.
* A sidecar restarted while its pod lives on (a crash, an OOM kill) finds the CR of this incarnation
  with what the main container published since start-up, and keeps that data rather than rolling it
  back to ``DISCOVERY_METADATA`` (the Python client also re-publishes after a reconnect, which covers
  a graceful restart, whose deregistration deleted the CR).

To the pod-facing API this is a ``MetadataPublisher``: ``publish`` raises the ``sidecar.ports`` errors
with a meaning (forbidden, invalid, not found, unavailable), never a Kubernetes client exception.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

import structlog

from sidecar.config import PodIdentity
from sidecar.core.backoff import Backoff
from sidecar.core.dynamo_schema import dynamo_metadata_problem
from sidecar.core.merge_patch import apply_merge_patch
from sidecar.core.resources import validate_worker_data
from sidecar.kube.api import CONNECTION_ERRORS, ApiError, KubeApi, ResourcePath
from sidecar.kube.sources import WORKER_METADATA
from sidecar.metrics import Metrics
from sidecar.ports import (
    Forbidden,
    Invalid,
    NotFound,
    NotRegistering,
    Registration,
    RegistrationError,
    TooLarge,
    Unavailable,
)

API_VERSION = "nvidia.com/v1alpha1"
KIND = "DynamoWorkerMetadata"
RESYNC_SECONDS = 60.0
PODS = ResourcePath("", "v1", "pods")
DYNAMO_FIELD_MANAGER = "dynamo-worker"
"""The field manager Dynamo's runtime (1.6.1) applies its ``DynamoWorkerMetadata`` under."""
REGISTER_MODES = ("auto", "never")


class Superseded(Forbidden):
    """This pod incarnation no longer exists (its Pod was deleted, or replaced under the same name by one
    with another UID): the sidecar stopped writing, and nothing it could retry will change that."""


def registration_error(exc: Exception, action: str) -> RegistrationError:
    """The meaning of a failed request (an ``ApiError`` or a connection error), with an operator's sentence."""
    if not isinstance(exc, ApiError):
        return Unavailable(f"cannot reach the API server to {action}: {type(exc).__name__}")
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


class Registrar:
    """Owns this pod's CR: the desired data, the last applied object, and the thread that keeps it applied.

    The daemon starts and deregisters it; the metadata reflector calls ``observe``; the gRPC layer
    calls ``registration`` and ``publish`` (as a ``MetadataPublisher``) from its threads.
    ``_apply_lock`` serialises applies (network IO: the loop and ``publish`` never interleave);
    ``_state_lock`` guards ``_data``, ``_applied``, ``_observed``, ``_last_error``, ``_deregistering``,
    ``_superseded``, ``_watch_only``, ``_adopt`` and ``_conflict`` and is never held during IO, so readers
    do not wait for the API server.
    """

    def __init__(
        self,
        api: KubeApi,
        identity: PodIdentity,
        labels: Mapping[str, str],
        initial_data: Mapping[str, Any],
        field_manager: str,
        metrics: Metrics,
        backoff_max: float = 30.0,
        register: str = "auto",
        metadata_name: str = "",
    ) -> None:
        self.api = api
        self.identity = identity
        self.labels = dict(labels)
        self.field_manager = field_manager
        self.metrics = metrics
        self.log = structlog.get_logger("sidecar.registration").bind(pod=identity.name)
        # The CR's name: the pod's, or {pod}-{container} in Dynamo's container mode. Owner references, the
        # incarnation check and the admission policy are still about the pod.
        self.metadata_name = metadata_name or identity.name
        self.path = WORKER_METADATA.resource.item(identity.namespace, self.metadata_name)
        self.pod_path = PODS.item(identity.namespace, identity.name)
        self._apply_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._data: dict[str, Any] = copy.deepcopy(dict(initial_data))
        self._applied: dict[str, Any] | None = None
        self._last_error = ""
        self._deregistering = False
        self._superseded = ""  # why this incarnation stopped writing for good; "" while it has not
        if register not in REGISTER_MODES:
            raise ValueError(f"register must be one of {REGISTER_MODES}, got {register!r}")
        # Why this sidecar writes nothing (another writer manages the CR, or DISCOVERY_REGISTER=never); ""
        # while it does.
        self._watch_only = (
            "watch-only (DISCOVERY_REGISTER=never): this sidecar does not write the pod's DynamoWorkerMetadata"
            if register == "never"
            else ""
        )
        self._observed: Mapping[str, Any] | None = None  # our CR as the watch last showed it (watch-only reads it)
        # Until the first apply (or a publish): keep the data of a CR of this incarnation found at start-up.
        self._adopt = True
        # The watch showed the CR of our name owned by another UID, or ours deleted by someone else: read the
        # Pod before writing again (``check_incarnation``).
        self._conflict = False
        self._pods_hint_logged = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._gone = threading.Event()  # our CR's deletion came back through the watch
        self.registered = threading.Event()
        # Whether a running watch shows this CR (``observe`` is called for it): then deregistration waits for
        # its deletion to come back through that watch; otherwise one GET confirms it (DISCOVERY_WATCH=auto
        # before any peer request, never, or a peer selector that leaves out this pod's own labels).
        self.confirm_by_watch = True
        self.backoff = Backoff(maximum=backoff_max)
        self._thread: threading.Thread | None = None

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
        with self._state_lock:
            data = copy.deepcopy(self._data)
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": self.metadata_name,
                "namespace": self.identity.namespace,
                "labels": dict(self.labels),
                "ownerReferences": self.owner_references(),
            },
            "spec": {"data": data},
        }

    def registration(self) -> Registration:
        with self._state_lock:
            watch_only = bool(self._watch_only)
            applied = (self._observed if watch_only else self._applied) or {}
            data = (
                copy.deepcopy((applied.get("spec") or {}).get("data") or {})
                if watch_only
                else copy.deepcopy(self._data)
            )
        if watch_only:  # the CR as its writer left it, when it is this incarnation's
            return Registration(
                registered=bool(applied),
                resource_version=(applied.get("metadata") or {}).get("resourceVersion", ""),
                data=data,
                labels=dict((applied.get("metadata") or {}).get("labels") or {}),
            )
        return Registration(
            registered=self.registered.is_set(),
            resource_version=(applied.get("metadata") or {}).get("resourceVersion", ""),
            data=data,
            labels=dict(self.labels),
        )

    @property
    def superseded(self) -> bool:
        """This pod incarnation no longer exists (its Pod is gone or has another UID): nothing is written any
        more, ever. Readiness fails through ``problems()``; the process has nothing left to do but exit."""
        with self._state_lock:
            return bool(self._superseded)

    @property
    def watch_only(self) -> str:
        """Why this sidecar writes nothing ("" while it registers the pod)."""
        with self._state_lock:
            return self._watch_only

    def problems(self) -> list[str]:
        with self._state_lock:
            superseded = self._superseded
            error = self._last_error
            watch_only = self._watch_only
        if superseded:
            return [superseded]
        if watch_only or self.registered.is_set():
            return []  # watch-only: the peers are served; whether the pod is registered is its writer's business
        return ["not registered" + (f": {error}" if error else "")]

    def notes(self) -> list[str]:
        """A healthy but unusual state, for ``/readyz``'s body: watch-only, and why."""
        reason = self.watch_only
        return [reason] if reason else []

    def _go_watch_only(self, manager: str) -> NotRegistering:
        """Stop writing for good: ``manager`` manages this pod's CR. Returns the error publishing raises."""
        message = (
            f"watch-only: this pod's DynamoWorkerMetadata is managed by {manager!r} (Dynamo's runtime in the main "
            "container), so this sidecar writes nothing and serves peers only; publish through Dynamo's runtime"
        )
        with self._state_lock:
            first = not self._watch_only
            if first:
                self._watch_only = message
            message = self._watch_only
        if first:
            self.log.warning("another writer manages this pod's CR: watch-only from now on", manager=manager)
            self._wake.set()
        return NotRegistering(message)

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
        with self._state_lock:
            first = not self._superseded
            if first:
                self._superseded = message
            message = self._superseded
        self.registered.clear()
        self.metrics.registered.set(0)
        if first:
            self.log.error("pod incarnation superseded: the sidecar stopped writing", reason=message)
        raise Superseded(message)

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
        once ``check_incarnation`` has confirmed that this incarnation is still the pod; a CR of ours that
        lists other owners too loses them (a merge patch preconditioned on the resourceVersion read).
        Returns this incarnation's CR as read (None when there is none now).
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
                return None
            except ApiError as exc:
                if exc.status == 404:
                    return None
                if exc.status != 409:  # 409: it changed since we read it; look again
                    raise

    def apply(self) -> dict[str, Any]:
        """Fence, then server-side apply the desired CR. Raises ``ApiError``, a connection error,
        ``Superseded`` (this incarnation no longer exists) or ``Unavailable`` (deregistering)."""
        with self._apply_lock:
            return self._apply_locked()

    def _apply_locked(self) -> dict[str, Any]:
        with self._state_lock:
            deregistering = self._deregistering
            superseded = self._superseded
        if superseded:  # nothing is ever written again: the CR of this name is the new incarnation's
            raise Superseded(superseded)
        if deregistering:  # nothing may re-create the CR once deregistration began
            raise Unavailable("this pod is deregistering (the sidecar is shutting down): nothing is written any more")
        watch_only = self.watch_only
        if watch_only:
            raise NotRegistering(watch_only)
        current = self.fence()
        if current is not None:
            manager = self._yield_to(current)
            if manager:
                with self._state_lock:
                    self._observed = current
                self.registered.set()
                raise self._go_watch_only(manager)
            self._adopt_published(current)
        applied = self.api.apply(self.path, self.desired(), self.field_manager)
        with self._state_lock:
            self._applied = applied
            self._adopt = False
            self._last_error = ""
        self._gone.clear()
        self.registered.set()
        self.metrics.registered.set(1)
        return applied

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

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        """Replace (or RFC 7386 merge-patch) spec.data and apply it now (``MetadataPublisher``).

        On any failure the previous data stays the desired data, so the loop keeps applying that.
        """
        with self._apply_lock:
            with self._state_lock:
                watch_only = self._watch_only
                previous = self._data
                adopt = self._adopt
                self._adopt = False  # what the main container publishes now wins over what the CR held
            if watch_only:
                raise NotRegistering(watch_only)
            new = apply_merge_patch(previous, dict(document)) if merge else copy.deepcopy(dict(document))
            problem = validate_worker_data(new) or dynamo_metadata_problem(new)
            if problem:
                with self._state_lock:
                    self._adopt = adopt
                raise Invalid(problem)
            with self._state_lock:
                self._data = new
            try:
                applied = self._apply_locked()
            except Exception as exc:
                with self._state_lock:
                    self._data = previous
                if not isinstance(exc, (ApiError, *CONNECTION_ERRORS)):
                    raise
                code = str(exc.status) if isinstance(exc, ApiError) else "connection"
                self.metrics.api_errors.labels("publish", code).inc()
                raise registration_error(exc, "publish metadata") from exc
        return Registration(
            registered=True,
            resource_version=applied["metadata"]["resourceVersion"],
            data=copy.deepcopy((applied.get("spec") or {}).get("data") or {}),
            labels=dict(self.labels),
        )

    # -- the loop --------------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run in a background thread; return it (the daemon's liveness probe watches it)."""
        self._thread = threading.Thread(target=self.run, name="registrar", daemon=True)
        self._thread.start()
        return self._thread

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                cr = self.apply()
                self.backoff.reset()
                self.log.info("registered", resource_version=cr["metadata"]["resourceVersion"])
                self._wake.wait(RESYNC_SECONDS)
                self._wake.clear()
                continue
            except (Superseded, NotRegistering):
                # Nothing to write, ever again. The thread stays (it is not dead: liveness) until the daemon stops it.
                self._stop.wait()
                return
            except ApiError as exc:
                self.metrics.api_errors.labels("register", str(exc.status)).inc()
                message = explain(exc, "register this pod's DynamoWorkerMetadata")
            except CONNECTION_ERRORS as exc:
                self.metrics.api_errors.labels("register", "connection").inc()
                message = f"cannot reach the API server to register: {type(exc).__name__}"
            except RegistrationError as exc:  # deregistration began while this pass was under way
                message = str(exc)
            if self._stop.is_set():
                break
            self.registered.clear()
            self.metrics.registered.set(0)
            with self._state_lock:
                self._last_error = message
            delay = self.backoff.next_delay()
            self.log.error("registration failed, retrying", reason=message, retry_in=round(delay, 2))
            self._stop.wait(delay)

    def observe(self, kind: str, obj: Mapping[str, Any]) -> None:
        """Watch observer for the metadata watch: react to changes of our own CR."""
        meta = obj.get("metadata") or {}
        if meta.get("name") != self.metadata_name or meta.get("namespace") != self.identity.namespace:
            return
        with self._state_lock:
            deregistering = self._deregistering
            superseded = self._superseded
        if superseded:
            return  # the CR of this name is the new incarnation's: nothing here is ours to react to
        ours = owned_by(obj, self.identity)
        with self._state_lock:
            self._observed = obj if ours and kind != "DELETED" else None
            watch_only = self._watch_only
        manager = self._yield_to(obj) if kind != "DELETED" else None
        if manager and not deregistering:
            self._go_watch_only(manager)
            watch_only = self.watch_only
        if watch_only:
            # Another writer's CR: follow it for GetSelf and readiness, never write it.
            (self.registered.set if ours and kind != "DELETED" else self.registered.clear)()
            self.metrics.registered.set(1 if self.registered.is_set() else 0)
            return
        if kind == "DELETED":
            if not owned_by(obj, self.identity):
                return  # another incarnation's CR (fencing removed it): not ours to re-create or confirm
            applied_uid = self._applied_uid()
            if applied_uid and meta.get("uid") != applied_uid:
                return  # an older object of ours, not the one this sidecar holds
            self._gone.set()
            if not deregistering and not self._stop.is_set():
                # Deleted by someone else: an admin, or a newer incarnation of this pod fencing. The loop reads
                # the Pod before re-creating the CR, so a replaced incarnation never writes it again.
                with self._state_lock:
                    self._conflict = True
                self.registered.clear()
                self.metrics.registered.set(0)
                self.log.warning("own CR was deleted from under the sidecar; re-creating it")
                self._wake.set()
        elif not owned_by(obj, self.identity):
            # Taken over by another owner: a newer incarnation of this pod, if this one was replaced. The loop
            # checks the Pod (``check_incarnation``) before it writes anything again.
            with self._state_lock:
                self._conflict = True
            if not deregistering:
                owners = [(r.get("name"), r.get("uid")) for r in meta.get("ownerReferences") or ()]
                self.log.warning("own CR now belongs to another owner; re-applying it", owners=owners)
                self._wake.set()
        elif not deregistering and (extra := other_owners(obj, self.identity)):
            self.log.warning("own CR lists other owners too; removing them", owners=extra)
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def deregister(self, timeout: float) -> bool:
        """Delete this incarnation's CR and wait until the watch saw it go. True when confirmed.

        A superseded incarnation deletes nothing (the CR of its name is the new pod's) and returns True.
        """
        with self._state_lock:
            self._deregistering = True
            watch_only = self._watch_only
        self.stop()
        if watch_only:
            self.log.info("not deregistering: watch-only, the CR is its writer's", reason=watch_only)
            return True
        with self._apply_lock:  # an apply under way finishes first; none starts after (they check _deregistering)
            applied_uid = self._applied_uid()
            try:
                self._check_conflict()  # the watch saw the CR of this name owned by another UID: whose is it?
            except Superseded:
                pass
            except (ApiError, *CONNECTION_ERRORS) as exc:
                self.log.warning("cannot check this pod incarnation before deregistering", error=str(exc))
        self.registered.clear()
        self.metrics.registered.set(0)
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
            self.log.error("deregistration failed: API server unreachable", error=type(exc).__name__)
            return False
        if self.confirm_by_watch:
            confirmed = self._gone.wait(timeout)
            self.log.info("deregistered", confirmed_by_watch=confirmed)
            return confirmed
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
