"""The loop every publisher runs, whatever it registers through (this pod's CR, or an etcd lease and its keys).

What is the same for every publisher lives here once, as ``SourceLoop`` is for every source:

* **One state, explicit** (``PublisherState``), each with its reason: registering (``UNREGISTERED``
  until it is, and again whenever it is lost), ``REGISTERED``, ``BLOCKED`` (nothing may be written until
  something outside the sidecar finishes: a CR being deleted), and the three states in which nothing is
  written any more: ``WATCH_ONLY`` (another writer owns the registration, or ``DISCOVERY_REGISTER=never``),
  ``SUPERSEDED`` (this pod incarnation no longer exists) and ``DEREGISTERING`` (shutting down).
  ``problems()`` and ``notes()`` (readiness) are read from it, and so is whether the loop, a publish or
  the deregistration may write.
* **The thread**: establish the registration, then hold it (the backend waits for the resync, a wake-up
  from its own watch, or a lost lease) and establish it again. A failure arrives with a meaning
  (``sidecar.peers.ports``: the backend translated its client's errors once) and is classified once:
  *unavailable* is transient and leaves the registration as it was (it most likely still stands, and
  failing readiness on every pod during an outage of the store would take them all out of their
  Services for nothing); anything else *needs a human* (forbidden, invalid, too large, not found) and,
  like a failure while the registration is known lost, leaves it unregistered. Then a jittered backoff.
  ``Blocked`` is neither: it is reported, the backoff is reset, and the loop looks again soon
  (``min(resync, BLOCKED_POLL_SECONDS)``, should the own watch miss the end of it).
* **What operators are told** (``RegistrationHealth``, owned here): lost and restored, blocked, failing
  and working again, each said once per change in logs, metrics and the stream's status. The backend
  says what happened (``health.lost``); the loop says the rest, and always tells ``health`` *before*
  ``registered`` is set, so whoever sees "registered" sees the stream told. A final state, and the
  deregistration, make it forget (no outage to report once nothing is written).
* **The one publish path**: merge (RFC 7386) or replace, validate (``validate_worker_data``, then what
  the backend refuses), make it the desired data, write it through the backend, and roll back to the
  previous data on any failure, so the loop keeps writing what was last accepted.
* **Deregistration**: nothing is written once it began; watch-only withdraws nothing (the registration
  is its writer's); the backend withdraws the rest and says whether it is confirmed.
* **The own watch** (``sidecar.peers.own_watch.OwnWatch``, built by the backend and set as ``own_watch``):
  the publisher tells it when it writes something else (``_registration_changed``) and reads whether it
  follows the registration (``own_watch_healthy``).

A backend subclasses ``PublisherLoop`` and implements ``_establish``, ``_hold``, ``_write``,
``_withdraw`` and ``registration`` (plus ``_refusal``, what it cannot register, and ``_failed`` where it
words a failure its own way). ``_apply_lock`` serialises everything that writes (the loop's passes,
``publish``, the withdrawal: network IO, never interleaved); ``_state_lock`` guards ``_state``,
``_reason``, ``_error`` and ``_data`` (and a subclass's own fields, which it names) and is never held
during IO, so readers never wait for the network.
"""

from __future__ import annotations

import copy
import enum
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from sidecar.core.backoff import Backoff
from sidecar.core.merge_patch import apply_merge_patch
from sidecar.core.resources import validate_worker_data
from sidecar.peers.metrics import Metrics
from sidecar.peers.own_watch import OwnWatch
from sidecar.peers.ports import (
    Blocked,
    Forbidden,
    Invalid,
    NotRegistering,
    RegisterMode,
    Registration,
    RegistrationError,
    Unavailable,
)
from sidecar.peers.registration_health import HealthListener, RegistrationHealth

RESYNC_SECONDS = 60.0
"""How often the registration is read back (and written if it changed) without an event saying so
(``DISCOVERY_REGISTRATION_RESYNC``)."""
BLOCKED_POLL_SECONDS = 5.0
"""While blocked: how often to look again, should the own watch miss the end of what blocks it."""


class PublisherState(enum.Enum):
    """Where a publisher is; ``writes``: whether it still (tries to) write the registration."""

    UNREGISTERED = "unregistered"  # not registered (yet, or any more: lost): the loop is establishing it
    REGISTERED = "registered"  # written and, as far as the publisher knows, in place
    BLOCKED = "blocked"  # nothing may be written until something outside finishes (its reason names it)
    WATCH_ONLY = "watch-only"  # another writer owns the registration (or DISCOVERY_REGISTER=never): writes nothing
    SUPERSEDED = "superseded"  # this pod incarnation no longer exists: writes nothing, ever
    DEREGISTERING = "deregistering"  # shutting down: writes nothing any more

    @property
    def writes(self) -> bool:
        return self in (PublisherState.UNREGISTERED, PublisherState.REGISTERED, PublisherState.BLOCKED)


class PublisherLoop:
    """Owns a publisher's thread, stop and wake-up events, state, desired metadata, apply lock, backoff,
    health and the registered gauge; the backend's subclass owns what it writes and how (see the module
    docstring).

    The daemon starts it and deregisters it; the probes read ``problems`` and ``notes``; the gRPC layer
    calls ``registration`` and ``publish`` from its threads; the own watch calls into the subclass.
    """

    thread_name: ClassVar[str] = "publisher"
    noun: ClassVar[str] = "this pod"
    """What is registered, for people ("this pod", "this instance")."""
    unregistered: ClassVar[str] = "not registered"
    """What ``problems()`` says while registering, before the reason."""

    def __init__(
        self,
        initial_data: Mapping[str, Any],
        *,
        metrics: Metrics | None,
        backoff_max: float,
        register: str,
        log: Any,
        watch_only_reason: str,
        resync: float = RESYNC_SECONDS,
        health_listener: HealthListener | None = None,
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.backoff = Backoff(maximum=backoff_max)
        self.resync = resync  # seconds between read-backs without an event (the backend's ``_hold``)
        # What happens to the registration (lost, restored, blocked, failing): logs, metrics and, through the
        # listener (the hub's ``set_registration_health``), the stream's status.
        self.health = RegistrationHealth(log, metrics)
        self.health.listener = health_listener
        # The watch of the registration (set by the backend's build; None: nothing follows it, e.g. watch-only).
        self.own_watch: OwnWatch | None = None
        self._apply_lock = threading.Lock()
        self._state_lock = threading.Lock()
        never = RegisterMode(register) is RegisterMode.NEVER
        self._state = PublisherState.WATCH_ONLY if never else PublisherState.UNREGISTERED
        # Why the state is what it is (BLOCKED and the states that write nothing; "" otherwise).
        self._reason = watch_only_reason if never else ""
        self._error = ""  # why the last attempt to register failed ("" once registered)
        self._data: dict[str, Any] = copy.deepcopy(dict(initial_data))  # the desired metadata
        # Set while registered (watch-only: while the registration its writer made stands); tests and the
        # backends wait on it.
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to make the loop establish the registration again now
        self._thread: threading.Thread | None = None

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def state(self) -> PublisherState:
        with self._state_lock:
            return self._state

    @property
    def watch_only(self) -> str:
        """Why this publisher writes nothing because another writer owns the registration ("" otherwise)."""
        with self._state_lock:
            return self._reason if self._state is PublisherState.WATCH_ONLY else ""

    @property
    def superseded(self) -> bool:
        """This pod incarnation no longer exists: nothing is written any more, ever."""
        return self.state is PublisherState.SUPERSEDED

    @property
    def own_watch_healthy(self) -> bool:
        """Whether the own watch follows the registration now (then it confirms what is withdrawn)."""
        return self.own_watch is not None and self.own_watch.healthy

    def _enter(self, state: PublisherState, reason: str) -> str:
        """Stop writing for good (``WATCH_ONLY``, ``SUPERSEDED``); returns the state's reason, the first one
        given (``""`` when the transition is not allowed: the state is already final, or deregistering)."""
        with self._state_lock:
            allowed = self._state.writes or (
                state is PublisherState.SUPERSEDED and self._state is PublisherState.DEREGISTERING
            )
            if self._state is state:
                return self._reason
            if not allowed:
                return ""
            self._state, self._reason = state, reason
        self._wake.set()
        return reason

    def _mark_registered(self, **fields: Any) -> None:
        """The registration is in place (watch-only: its writer's is). ``fields``: for the log line that says
        it works again or was restored (a resourceVersion, a lease)."""
        with self._state_lock:
            if self._state in (PublisherState.UNREGISTERED, PublisherState.BLOCKED):
                self._state, self._reason = PublisherState.REGISTERED, ""
            self._error = ""
            writes = self._state.writes
        if writes:
            self.health.in_place(**fields)  # first: whoever sees "registered" sees the stream told
        self.registered.set()
        if self.metrics is not None:
            self.metrics.registered.set(1)

    def _mark_unregistered(self, error: str | None = None) -> None:
        """The registration is not in place (``error``: why, for ``problems()``; None keeps the last)."""
        with self._state_lock:
            if self._state is PublisherState.REGISTERED:
                self._state = PublisherState.UNREGISTERED
            if error is not None:
                self._error = error
        self.registered.clear()
        if self.metrics is not None:
            self.metrics.registered.set(0)

    def _block(self, reason: str) -> None:
        """Nothing may be written until what ``reason`` names is over: not registered, and that is why (the
        stream told first, as for ``_mark_registered``: whoever sees ``BLOCKED`` sees the stream told)."""
        if not self.state.writes:
            return
        self._mark_unregistered()
        self.health.blocked(reason)
        with self._state_lock:
            if self._state.writes:  # (a final state reached meanwhile stays: the loop then forgets the wait)
                self._state, self._reason, self._error = PublisherState.BLOCKED, reason, reason

    def problems(self) -> list[str]:
        """Why the pod is not registered right now (empty: registered, or watch-only)."""
        with self._state_lock:
            state, reason, error = self._state, self._reason, self._error
        if state is PublisherState.SUPERSEDED:
            return [reason]
        if state is PublisherState.WATCH_ONLY or self.registered.is_set():
            return []  # watch-only: the peers are served; whether the pod is registered is its writer's business
        why = reason if state is PublisherState.BLOCKED else error
        return [self.unregistered + (f": {why}" if why else "")]

    def notes(self) -> list[str]:
        """A healthy but unusual state, for ``/readyz``'s body: watch-only, and why."""
        reason = self.watch_only
        return [reason] if reason else []

    def _check_writes(self) -> None:
        """Raise the meaning of "nothing is written now" unless the state writes."""
        with self._state_lock:
            state, reason = self._state, self._reason
        if state is PublisherState.WATCH_ONLY:
            raise NotRegistering(reason)
        if state is PublisherState.SUPERSEDED:
            raise self._superseded_error(reason)
        if state is PublisherState.DEREGISTERING:
            raise Unavailable(
                f"{self.noun} is deregistering (the sidecar is shutting down): nothing is written any more"
            )

    def _superseded_error(self, reason: str) -> RegistrationError:
        return Forbidden(reason)

    def _registration_changed(self) -> None:
        """What is written changed its shape (other keys, a new lease): the own watch follows the new one."""
        if self.own_watch is not None:
            self.own_watch.refresh()

    # -- the desired data and the one publish path ---------------------------------------------------------
    def data(self) -> dict[str, Any]:
        """A copy of the desired metadata (what the loop keeps written)."""
        with self._state_lock:
            return copy.deepcopy(self._data)

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        """Replace (or RFC 7386 merge-patch) the metadata and write it now (``Publisher``).

        Raises a ``RegistrationError`` with a meaning; on any failure the previous metadata stays the
        desired one, so the loop keeps writing that.
        """
        with self._apply_lock:
            self._check_writes()
            with self._state_lock:
                previous = self._data
            new = apply_merge_patch(previous, dict(document)) if merge else copy.deepcopy(dict(document))
            problem = validate_worker_data(new) or self._refusal(previous, new)
            if problem:
                raise Invalid(problem)
            self._accepted()
            with self._state_lock:
                self._data = new
            try:
                return self._write(new)
            except BaseException:
                with self._state_lock:
                    self._data = previous
                raise

    # -- what a backend implements ---------------------------------------------------------------------------
    def registration(self) -> Registration:
        raise NotImplementedError

    def _refusal(self, previous: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
        """Why the backend cannot register ``new`` after ``previous`` (beyond ``validate_worker_data``), or None."""
        return None

    def _accepted(self) -> None:
        """A publish passed validation (called under ``_apply_lock``, before its write)."""

    def _write(self, data: Mapping[str, Any]) -> Registration:
        """Write ``data`` now (under ``_apply_lock``) and return the registration as stored; raise a
        ``RegistrationError`` with its meaning."""
        raise NotImplementedError

    def _establish(self) -> None:
        """One pass of the loop: make the registration exist as the desired data says (``_mark_registered``
        once it does); raise a ``RegistrationError`` with its meaning (``Blocked``: waited out)."""
        raise NotImplementedError

    def _hold(self) -> None:
        """Keep the registration until it must be established again (woken, due, or lost), or the stop."""
        raise NotImplementedError

    def _failed(self, message: str, needs_human: bool) -> None:
        """A pass failed with ``message``. ``needs_human``: the meaning says retrying as is will not help
        (forbidden, invalid, too large, not found), as opposed to unavailable. A transient failure leaves
        ``registered`` as it was; one that needs a human, or one while the registration is known lost or
        was never made, leaves it unregistered."""
        if needs_human or self.health.is_lost or not self.registered.is_set():
            self._mark_unregistered(message)
        else:
            with self._state_lock:
                self._error = message

    def _withdraw(self, timeout: float) -> bool:
        """Withdraw the registration (peers see this pod leave); True when confirmed within ``timeout``."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run in a background thread; return it (the daemon's liveness probe watches it)."""
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self._thread

    def run(self) -> None:
        if self.state is PublisherState.WATCH_ONLY:  # from the start: DISCOVERY_REGISTER=never
            self.log.info("watch-only: nothing is written", reason=self.watch_only)
        while not self._stop.is_set():
            if not self.state.writes:
                # Nothing to write, ever again: no outage to report. The thread stays (it is not dead:
                # liveness) until stopped.
                self.health.forget()
                self._stop.wait()
                return
            try:
                self._establish()
            except Blocked as exc:
                self._block(str(exc))
                self.backoff.reset()
                # poll: the own watch wakes it at once when what blocks it is over; this is in case it misses that
                self._sleep(min(self.resync, BLOCKED_POLL_SECONDS))
                continue
            except RegistrationError as exc:
                message, needs_human = str(exc), not isinstance(exc, Unavailable)
            except Exception as exc:  # a bug must cost a retry, never the registration
                self.log.exception("unexpected error registering; retrying")
                message, needs_human = f"unexpected error: {type(exc).__name__}: {exc}", True
            else:
                self.backoff.reset()
                self._hold()
                continue
            if self._stop.is_set() or not self.state.writes:
                continue  # stopped, or a final state reached during the pass (deregistering, superseded, ...)
            self._failed(message, needs_human)
            self.health.failed(message, needs_human=needs_human)
            self._stop.wait(self.backoff.next_delay())

    def _sleep(self, seconds: float) -> None:
        """Wait until woken, stopped, or ``seconds`` pass."""
        self._wake.wait(seconds)
        self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def deregister(self, timeout: float = 5.0) -> bool:
        """Stop writing and withdraw the registration; True when confirmed. Watch-only withdraws nothing."""
        with self._state_lock:
            before = self._state
            if before.writes:
                self._state = PublisherState.DEREGISTERING
        self.stop()
        self.health.forget()
        if before is PublisherState.WATCH_ONLY:
            self.log.info("not deregistering: watch-only, the registration is its writer's", reason=self.watch_only)
            return True
        return self._withdraw(timeout)
