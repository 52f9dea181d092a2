"""This pod's own ``DynamoWorkerMetadata``: apply it, keep it, fence stale ones, and withdraw it.

* The CR is named after the pod, owned by the Pod (name + UID, ``controller: false``,
  ``blockOwnerDeletion: false``, as Dynamo writes it) so garbage collection removes it with the pod,
  and written with server-side apply under one field manager.
* Fencing at start-up: a CR left by an earlier incarnation of this pod name (another UID) is deleted
  and re-created, never adopted; the delete carries preconditions (that object's UID and
  resourceVersion) so that, racing another writer, it can only ever remove the stale object it saw.
* The registrar follows its own CR through the metadata watch: deleted from under it (or taken over
  by another owner), it is re-applied.
* Deregistration (SIGTERM) deletes the CR, again only this incarnation's (UID precondition), and waits
  until the deletion has come back through the watch: then peers watching the API server see it too.

To the pod-facing API this is a ``MetadataPublisher``: ``publish`` raises the ``sidecar.ports`` errors
with a meaning (forbidden, invalid, not found, unavailable), never a Kubernetes client exception.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

import structlog

from sidecar.config import PodIdentity
from sidecar.core.backoff import Backoff
from sidecar.core.merge_patch import apply_merge_patch
from sidecar.core.resources import validate_worker_data
from sidecar.kube.api import CONNECTION_ERRORS, ApiError, KubeApi
from sidecar.kube.sources import WORKER_METADATA
from sidecar.metrics import Metrics
from sidecar.ports import Forbidden, Invalid, NotFound, Registration, RegistrationError, TooLarge, Unavailable

API_VERSION = "nvidia.com/v1alpha1"
KIND = "DynamoWorkerMetadata"
RESYNC_SECONDS = 60.0


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
    if exc.status == 404 and "could not find the requested resource" in exc.message:
        return f"cannot {action}: the DynamoWorkerMetadata CRD is not installed (kubectl apply -f manifests/crd.yaml)"
    if exc.status == 422:
        return f"the API server rejected the CR while trying to {action}: {exc.message}"
    return f"cannot {action}: {exc}"


def owned_by(obj: Mapping[str, Any], identity: PodIdentity) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("kind") == "Pod" and r.get("uid") == identity.uid and r.get("name") == identity.name for r in refs)


class Registrar:
    """Owns this pod's CR: the desired data, the last applied object, and the thread that keeps it applied.

    The daemon starts and deregisters it; the metadata reflector calls ``observe``; the gRPC layer
    calls ``registration`` and ``publish`` (as a ``MetadataPublisher``) from its threads.
    ``_apply_lock`` serialises applies (network IO: the loop and ``publish`` never interleave);
    ``_state_lock`` guards ``_data``, ``_applied``, ``_last_error`` and ``_deregistering`` and is never
    held during IO, so readers do not wait for the API server.
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
    ) -> None:
        self.api = api
        self.identity = identity
        self.labels = dict(labels)
        self.field_manager = field_manager
        self.metrics = metrics
        self.log = structlog.get_logger("sidecar.registration").bind(pod=identity.name)
        self.path = WORKER_METADATA.resource.item(identity.namespace, identity.name)
        self._apply_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._data: dict[str, Any] = copy.deepcopy(dict(initial_data))
        self._applied: dict[str, Any] | None = None
        self._last_error = ""
        self._deregistering = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._gone = threading.Event()  # our CR's deletion came back through the watch
        self.registered = threading.Event()
        self.backoff = Backoff(maximum=backoff_max)
        self._thread: threading.Thread | None = None

    # -- the desired object ---------------------------------------------------------------------------
    def desired(self) -> dict[str, Any]:
        with self._state_lock:
            data = copy.deepcopy(self._data)
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": self.identity.name,
                "namespace": self.identity.namespace,
                "labels": dict(self.labels),
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": self.identity.name,
                        "uid": self.identity.uid,
                        "controller": False,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "spec": {"data": data},
        }

    def registration(self) -> Registration:
        with self._state_lock:
            applied = self._applied or {}
            data = copy.deepcopy(self._data)
        return Registration(
            registered=self.registered.is_set(),
            resource_version=(applied.get("metadata") or {}).get("resourceVersion", ""),
            data=data,
            labels=dict(self.labels),
        )

    def problems(self) -> list[str]:
        if self.registered.is_set():
            return []
        with self._state_lock:
            error = self._last_error
        return ["not registered" + (f": {error}" if error else "")]

    # -- one pass ---------------------------------------------------------------------------------------
    def fence(self) -> None:
        """Delete a leftover CR that belongs to another pod incarnation (never adopt it)."""
        while True:
            try:
                current = self.api.get(self.path)
            except ApiError as exc:
                if exc.status == 404 and "could not find the requested resource" not in exc.message:
                    return
                raise
            if owned_by(current, self.identity):
                return
            meta = current["metadata"]
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
                return
            except ApiError as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:  # 409: it changed since we read it; look again
                    raise

    def apply(self) -> dict[str, Any]:
        """Fence, then server-side apply the desired CR. Raises ``ApiError`` or a connection error."""
        with self._apply_lock:
            return self._apply_locked()

    def _apply_locked(self) -> dict[str, Any]:
        with self._state_lock:
            deregistering = self._deregistering
        if deregistering:  # nothing may re-create the CR once deregistration began
            raise Unavailable("this pod is deregistering (the sidecar is shutting down): nothing is written any more")
        self.fence()
        applied = self.api.apply(self.path, self.desired(), self.field_manager)
        with self._state_lock:
            self._applied = applied
            self._last_error = ""
        self._gone.clear()
        self.registered.set()
        self.metrics.registered.set(1)
        return applied

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        """Replace (or RFC 7386 merge-patch) spec.data and apply it now (``MetadataPublisher``).

        On any failure the previous data stays the desired data, so the loop keeps applying that.
        """
        with self._apply_lock:
            with self._state_lock:
                previous = self._data
            new = apply_merge_patch(previous, dict(document)) if merge else copy.deepcopy(dict(document))
            problem = validate_worker_data(new)
            if problem:
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
        if meta.get("name") != self.identity.name or meta.get("namespace") != self.identity.namespace:
            return
        with self._state_lock:
            deregistering = self._deregistering
        if kind == "DELETED":
            if not owned_by(obj, self.identity):
                return  # another incarnation's CR (fencing removed it): not ours to re-create or confirm
            applied_uid = self._applied_uid()
            if applied_uid and meta.get("uid") != applied_uid:
                return  # an older object of ours, not the one this sidecar holds
            self._gone.set()
            if not deregistering and not self._stop.is_set():
                self.registered.clear()
                self.metrics.registered.set(0)
                self.log.warning("own CR was deleted from under the sidecar; re-creating it")
                self._wake.set()
        elif not owned_by(obj, self.identity) and not deregistering:
            self.log.warning("own CR now belongs to another owner; re-applying it")
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def deregister(self, timeout: float) -> bool:
        """Delete this incarnation's CR and wait until the watch saw it go. True when confirmed."""
        with self._state_lock:
            self._deregistering = True
        self.stop()
        with self._apply_lock:  # an apply under way finishes first; none starts after (they check _deregistering)
            applied_uid = self._applied_uid()
        self.registered.clear()
        self.metrics.registered.set(0)
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
        confirmed = self._gone.wait(timeout)
        self.log.info("deregistered", confirmed_by_watch=confirmed)
        return confirmed

    def _applied_uid(self) -> str:
        with self._state_lock:
            uid: str = ((self._applied or {}).get("metadata") or {}).get("uid", "")
        return uid
