"""The loop every publisher runs, whatever it registers through (this pod's CR, or an etcd lease and its keys).

What is the same for every publisher lives here once, as ``SourceLoop`` is for every source:

* **One state, explicit** (``PublisherState``): registering (``UNREGISTERED`` until it is, and again
  whenever it is lost), ``REGISTERED``, and the three states in which nothing is written any more:
  ``WATCH_ONLY`` (another writer owns the registration, or ``DISCOVERY_REGISTER=never``),
  ``SUPERSEDED`` (this pod incarnation no longer exists) and ``DEREGISTERING`` (shutting down). Each
  comes with its reason; ``problems()`` and ``notes()`` (readiness) are read from it, and so is whether
  the loop, a publish or the deregistration may write.
* **The thread**: establish the registration, hold it (until the backend says it must be established
  again), and on failure report it, mark it unregistered and retry after a jittered backoff. Errors
  arrive with a meaning (``sidecar.peers.ports``): the backend translated its client's errors once.
* **The one publish path**: merge (RFC 7386) or replace, validate (``validate_worker_data``, then what
  the backend refuses), make it the desired data, write it through the backend, and roll back to the
  previous data on any failure, so the loop keeps writing what was last accepted.
* **Deregistration**: nothing is written once it began; watch-only deletes nothing (the registration is
  its writer's); the backend withdraws the rest.

A backend subclasses ``PublisherLoop`` and implements ``_establish``, ``_hold``, ``_write``,
``_withdraw`` and ``registration`` (plus ``_refusal``, what it cannot register). ``_apply_lock``
serialises everything that writes (the loop's passes, ``publish``, the withdrawal: network IO, never
interleaved); ``_state_lock`` guards ``_state``, ``_reason``, ``_error`` and ``_data`` (and a subclass's
own fields, which it names) and is never held during IO, so readers never wait for the network.
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
from sidecar.peers.ports import (
    Forbidden,
    Invalid,
    NotRegistering,
    RegisterMode,
    Registration,
    RegistrationError,
    Unavailable,
)


class PublisherState(enum.Enum):
    """Where a publisher is; ``writes``: whether it still writes the registration."""

    UNREGISTERED = "unregistered"  # not registered (yet, or any more): the loop is trying
    REGISTERED = "registered"  # written and, as far as the publisher knows, in place
    WATCH_ONLY = "watch-only"  # another writer owns the registration (or DISCOVERY_REGISTER=never): writes nothing
    SUPERSEDED = "superseded"  # this pod incarnation no longer exists: writes nothing, ever
    DEREGISTERING = "deregistering"  # shutting down: writes nothing any more

    @property
    def writes(self) -> bool:
        return self in (PublisherState.UNREGISTERED, PublisherState.REGISTERED)


class PublisherLoop:
    """Owns a publisher's thread, stop and wake-up events, state, desired metadata, apply lock, backoff and
    the registered gauge; the backend's subclass owns what it writes and how (see the module docstring).

    The daemon starts it and deregisters it; the probes read ``problems`` and ``notes``; the gRPC layer
    calls ``registration`` and ``publish`` from its threads.
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
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.backoff = Backoff(maximum=backoff_max)
        self._apply_lock = threading.Lock()
        self._state_lock = threading.Lock()
        never = RegisterMode(register) is RegisterMode.NEVER
        self._state = PublisherState.WATCH_ONLY if never else PublisherState.UNREGISTERED
        self._reason = watch_only_reason if never else ""  # why the state is what it is (the non-writing ones)
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

    def _mark_registered(self) -> None:
        """The registration is in place (watch-only: its writer's is)."""
        with self._state_lock:
            if self._state is PublisherState.UNREGISTERED:
                self._state = PublisherState.REGISTERED
            self._error = ""
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

    def problems(self) -> list[str]:
        """Why the pod is not registered right now (empty: registered, or watch-only)."""
        with self._state_lock:
            state, reason, error = self._state, self._reason, self._error
        if state is PublisherState.SUPERSEDED:
            return [reason]
        if state is PublisherState.WATCH_ONLY or self.registered.is_set():
            return []  # watch-only: the peers are served; whether the pod is registered is its writer's business
        return [self.unregistered + (f": {error}" if error else "")]

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
        """Why the backend cannot register ``new`` (beyond ``validate_worker_data``), or None."""
        return None

    def _accepted(self) -> None:
        """A publish passed validation (called under ``_apply_lock``, before its write)."""

    def _write(self, data: Mapping[str, Any]) -> Registration:
        """Write ``data`` now (under ``_apply_lock``); raise a ``RegistrationError`` with its meaning."""
        raise NotImplementedError

    def _establish(self) -> None:
        """One pass of the loop: make the registration exist as the desired data says (``_mark_registered``
        once it does); raise a ``RegistrationError`` with its meaning."""
        raise NotImplementedError

    def _hold(self) -> None:
        """Keep the registration until it must be established again (woken, due, or lost), or the stop."""
        raise NotImplementedError

    def _failed(self, message: str, needs_human: bool) -> None:
        """A pass failed with ``message``: not registered, and that is why. ``needs_human``: the meaning says
        retrying as is will not help (forbidden, invalid, too large, not found), as opposed to unavailable."""
        self._mark_unregistered(message)

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
                # Nothing to write, ever again. The thread stays (it is not dead: liveness) until stopped.
                self._stop.wait()
                return
            try:
                self._establish()
                self.backoff.reset()
                self._hold()
                continue
            except RegistrationError as exc:
                message, needs_human = str(exc), not isinstance(exc, Unavailable)
            except Exception as exc:  # a bug must cost a retry, never the registration
                self.log.exception("unexpected error registering; retrying")
                message, needs_human = f"unexpected error: {type(exc).__name__}: {exc}", True
            if self._stop.is_set() or not self.state.writes:
                continue
            self._failed(message, needs_human)
            delay = self.backoff.next_delay()
            self.log.error("registration failed, retrying", reason=message, retry_in=round(delay, 2))
            self._stop.wait(delay)

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
        if before is PublisherState.WATCH_ONLY:
            self.log.info("not deregistering: watch-only, the registration is its writer's", reason=self.watch_only)
            return True
        return self._withdraw(timeout)
