"""How this pod's registration is doing, said once per change, for either publisher (the CR or the lease).

Both publishers follow their own registration (the CR through a watch of that one object, the lease's
keys through a watch of those keys), restore it when it is lost, wait out an object that is being
deleted, and retry writes that fail. What they tell operators, metrics and the stream about that is the
same, so it lives here once, and the publishers only say what happened:

* **lost, then restored** (deleted from under the sidecar, taken over, altered, a revoked lease): one
  warning when it is found lost, one info line when it is back with how long it was gone;
  ``discovery_registration_lost_total{reason}``, ``discovery_registration_restored_total{reason}`` and
  ``discovery_registration_restore_seconds``. A loss that is restored at once is not an outage: the
  stream is not told (every client would see DEGRADED and CONNECTED within a second for nothing).
* **blocked**: waiting out an object that is being deleted (a finalizer holds it): a warning naming the
  object and its finalizers (again only when the reason changes), ``discovery_registration_blocked`` is 1,
  the stream says DEGRADED with the reason, and ``blocking()`` gives readiness the reason.
* **failing writes**: a transient failure (unreachable, throttled, a server error) logs one warning when
  the outage starts and one info line when a write succeeds again, with its length and the attempts; a
  failure that needs a human (forbidden, invalid, the CRD missing) is an error, once per distinct reason.
  The attempts in between are counted (``discovery_api_errors_total``, by the publisher), not logged
  above debug. The stream says DEGRADED for the registration while its writes fail.

Nothing here does IO or knows a backend; ``_lock`` guards every field below it, and the log, the metrics
and the health listener are called outside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sidecar.peers.metrics import Metrics

HealthListener = Callable[[bool, str], None]
"""Told (healthy, reason) when the registration starts or stops being degraded (the stream's status)."""


class RegistrationHealth:
    """Owns the registration's lost / blocked / failing state and says each change once.

    A publisher calls ``lost``, ``blocked``, ``failed`` and ``in_place`` from its threads; the daemon sets
    ``listener`` (the hub, for the stream's status) before the publisher starts.
    """

    def __init__(self, log: Any, metrics: Metrics | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.metrics = metrics
        self.clock = clock
        self.listener: HealthListener | None = None
        self._lock = threading.Lock()
        self._lost: tuple[float, str] | None = None  # (since, reason label) while lost and not yet restored
        self._blocked = ""  # why the registration cannot be written now (an object being deleted); "" if not
        self._failing_since: float | None = None  # first failed write of the current run of failures
        self._failures = 0  # failed writes in the current run
        self._failure = ""  # the last failure's reason
        self._human = ""  # the last failure that needs a human, as logged (logged again only when it changes)
        self._degraded = ""  # what the listener was last told ("" healthy)

    # -- what happened -------------------------------------------------------------------------------
    def lost(self, reason: str, detail: str, **fields: Any) -> None:
        """The registration is gone or not as written (``reason``: a short label for the metric)."""
        with self._lock:
            first = self._lost is None
            if first:
                self._lost = (self.clock(), reason)
        if self.metrics is not None:
            self.metrics.registration_lost.labels(reason).inc()
        if first:
            self.log.warning("registration lost; restoring it", reason=reason, detail=detail, **fields)
        else:
            self.log.debug("registration lost again before it was restored", reason=reason, detail=detail, **fields)

    def blocked(self, reason: str) -> None:
        """Nothing can be written until something outside the sidecar finishes (an object being deleted)."""
        with self._lock:
            changed = reason != self._blocked
            self._blocked = reason
        if self.metrics is not None:
            self.metrics.registration_blocked.set(1)
        if changed:
            self.log.warning("registration waiting", reason=reason)
        self._tell(reason)

    def failed(self, reason: str, *, needs_human: bool) -> float:
        """A write failed; returns how long the current run of failures has lasted (seconds)."""
        now = self.clock()
        with self._lock:
            first = self._failing_since is None
            if first:
                self._failing_since = now
            since = self._failing_since if self._failing_since is not None else now
            self._failures += 1
            self._failure = reason
            human_changed = needs_human and reason != self._human
            if needs_human:
                self._human = reason
        if needs_human and human_changed:
            self.log.error("registration failed: this needs a human", reason=reason)
        elif first:
            self.log.warning("registration failing; retrying", reason=reason)
        else:
            self.log.debug("registration still failing", reason=reason)
        self._tell(reason)
        return now - since

    def in_place(self, **fields: Any) -> None:
        """The registration is written and ours again: ends whatever was lost, blocked or failing."""
        now = self.clock()
        with self._lock:
            lost, self._lost = self._lost, None
            blocked, self._blocked = self._blocked, ""
            since, self._failing_since = self._failing_since, None
            failures, self._failures = self._failures, 0
            self._failure = self._human = ""
        if blocked and self.metrics is not None:
            self.metrics.registration_blocked.set(0)
        if since is not None:
            self.log.info(
                "registration works again", outage_seconds=round(now - since, 3), failed_attempts=failures, **fields
            )
        elif blocked:
            self.log.info("registration no longer waiting", waited_for=blocked, **fields)
        if lost is not None:
            seconds = now - lost[0]
            if self.metrics is not None:
                self.metrics.registration_restored.labels(lost[1]).inc()
                self.metrics.registration_restore_seconds.observe(seconds)
            self.log.info("registration restored", reason=lost[1], seconds=round(seconds, 3), **fields)
        self._tell("")

    def forget(self) -> None:
        """Nothing is written any more (deregistering, watch-only, superseded): no outage to report."""
        with self._lock:
            blocked = self._blocked
            self._lost = self._failing_since = None
            self._blocked = self._failure = self._human = ""
            self._failures = 0
        if blocked and self.metrics is not None:
            self.metrics.registration_blocked.set(0)
        self._tell("")

    # -- what readers ask ------------------------------------------------------------------------------
    def blocking(self) -> str:
        """Why nothing can be written now ("" when nothing blocks it)."""
        with self._lock:
            return self._blocked

    @property
    def is_lost(self) -> bool:
        with self._lock:
            return self._lost is not None

    def _tell(self, reason: str) -> None:
        """Tell the listener on a change of degraded-ness or of its reason."""
        with self._lock:
            if reason == self._degraded:
                return
            self._degraded = reason
        if self.listener is not None:
            self.listener(not reason, reason)
