"""Tests for sidecar.peers.publisher_loop: the one loop, state and publish path both publishers share.

A scripted backend (``Scripted``) says what each establish and write does; the tests pin what the loop
makes of it. Both real publishers run the same code: tests/unit/test_registration.py (the CR) and
tests/unit/test_etcd_publisher.py (the lease) cover what each writes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog

from devcluster.waiting import wait_for
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    Blocked,
    Forbidden,
    Invalid,
    NotRegistering,
    Registration,
    RegistrationError,
    Unavailable,
)
from sidecar.peers.publisher_loop import PublisherLoop, PublisherState

DEADLINE = 10.0
VALID = {"endpoints": {}, "custom": 1}


class Scripted(PublisherLoop):
    """A backend whose establish and write answer from scripts (an exception is raised, anything else is
    success); records what it was asked to write. ``held`` blocks the loop until the test releases it."""

    thread_name = "scripted-publisher"

    def __init__(self, register: str = "auto") -> None:
        super().__init__(
            {"endpoints": {}},
            metrics=Metrics(),
            backoff_max=0.01,
            register=register,
            log=structlog.get_logger("test"),
            watch_only_reason="watch-only: DISCOVERY_REGISTER=never (scripted)",
        )
        self.establishes: queue.Queue[BaseException | None] = queue.Queue()
        self.writes: list[Mapping[str, Any]] = []
        self.write_error: BaseException | None = None
        self.refuse = ""
        self.withdrawn: list[float] = []
        self.passes = 0
        self.held = threading.Event()

    def registration(self) -> Registration:
        return Registration(self.registered.is_set(), "", self.data(), name="scripted", peer_uid="u", instance_id=1)

    def _refusal(self, previous: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
        return self.refuse or None

    def _write(self, data: Mapping[str, Any]) -> Registration:
        if self.write_error is not None:
            raise self.write_error
        self.writes.append(dict(data))
        return self.registration()

    def _establish(self) -> None:
        self.passes += 1
        step = self.establishes.get(timeout=DEADLINE) if not self.establishes.empty() else None
        if step is not None:
            raise step
        self._mark_registered()

    def _hold(self) -> None:
        self.held.set()
        self._sleep(DEADLINE)

    def _withdraw(self, timeout: float) -> bool:
        self.withdrawn.append(timeout)
        self._mark_unregistered()
        return True


@pytest.fixture
def publisher() -> Iterator[Scripted]:
    p = Scripted()
    yield p
    p.stop()


class TestTheLoop:
    def test_registers_then_holds(self, publisher: Scripted) -> None:
        """One pass registers (state, event and gauge agree); then the loop holds until woken."""
        assert publisher.state is PublisherState.UNREGISTERED and publisher.problems() == ["not registered"]
        publisher.start()
        assert publisher.held.wait(DEADLINE)
        assert publisher.state is PublisherState.REGISTERED and publisher.registered.is_set()
        assert publisher.metrics is not None and publisher.metrics.registered._value.get() == 1
        assert publisher.problems() == [] and publisher.notes() == []

    def test_a_failure_is_unregistered_with_its_reason_and_retried(self, publisher: Scripted) -> None:
        """Errors arrive with a meaning; problems() says the last one until a pass succeeds."""
        publisher.establishes.put(Unavailable("cannot reach the store (scripted)"))
        publisher.establishes.put(Forbidden("forbidden to register (scripted)"))
        seen: list[list[str]] = []
        publisher.start()
        wait_for(lambda: seen.append(publisher.problems()) or publisher.registered.is_set(), DEADLINE, "a retry")
        assert ["not registered: cannot reach the store (scripted)"] in seen or [
            "not registered: forbidden to register (scripted)"
        ] in seen
        assert publisher.passes == 3 and publisher.problems() == []

    def test_a_bug_costs_a_retry_not_the_thread(self, publisher: Scripted) -> None:
        publisher.establishes.put(KeyError("a bug"))
        thread = publisher.start()
        assert publisher.held.wait(DEADLINE) and thread.is_alive() and publisher.passes == 2

    def test_a_final_state_ends_the_passes_but_not_the_thread(self, publisher: Scripted) -> None:
        """Watch-only, reached during a pass: nothing is written any more; the thread lives (liveness)."""

        def watch_only() -> None:
            publisher._enter(PublisherState.WATCH_ONLY, "watch-only: another writer (scripted)")
            raise NotRegistering("watch-only: another writer (scripted)")

        publisher._establish = watch_only  # type: ignore[method-assign]
        thread = publisher.start()
        wait_for(lambda: publisher.watch_only, DEADLINE, "watch-only")
        assert thread.is_alive() and publisher.problems() == []
        assert publisher.notes() == ["watch-only: another writer (scripted)"]
        with pytest.raises(NotRegistering, match="another writer"):
            publisher.publish(VALID, merge=False)
        assert publisher.writes == []

    def test_watch_only_from_the_start_writes_nothing_and_withdraws_nothing(self) -> None:
        publisher = Scripted(register="never")
        thread = publisher.start()
        try:
            assert publisher.state is PublisherState.WATCH_ONLY and thread.is_alive()
            assert publisher.problems() == [] and "DISCOVERY_REGISTER=never" in publisher.notes()[0]
            with pytest.raises(NotRegistering, match="DISCOVERY_REGISTER=never"):
                publisher.publish(VALID, merge=True)
            assert publisher.deregister(timeout=1) is True and publisher.withdrawn == []
            assert publisher.passes == 0 and publisher.writes == []
        finally:
            publisher.stop()


class TestPublish:
    def test_replace_and_merge_become_the_desired_data(self, publisher: Scripted) -> None:
        publisher.publish({"endpoints": {}, "a": {"b": 1, "c": 2}}, merge=False)
        registration = publisher.publish({"a": {"b": None}, "d": 3}, merge=True)  # RFC 7386: null removes
        assert publisher.writes[-1] == {"endpoints": {}, "a": {"c": 2}, "d": 3} == registration.data
        assert publisher.data() == publisher.writes[-1]

    @pytest.mark.parametrize(
        ("document", "refuse", "fragment"),
        [
            ({"endpoints": []}, "", "endpoints must be a JSON object"),
            ({"x": 1}, "it cannot be registered", "cannot be"),
        ],
    )
    def test_invalid_is_refused_before_any_write(
        self, publisher: Scripted, document: Any, refuse: str, fragment: str
    ) -> None:
        """The common check first (validate_worker_data), then what the backend refuses: nothing written."""
        publisher.refuse = refuse
        with pytest.raises(Invalid, match=fragment):
            publisher.publish(document, merge=False)
        assert publisher.writes == [] and publisher.data() == {"endpoints": {}}

    @pytest.mark.parametrize("error", [Unavailable("store unreachable"), Forbidden("forbidden"), KeyError("bug")])
    def test_a_failed_write_rolls_back_to_the_previous_data(self, publisher: Scripted, error: BaseException) -> None:
        publisher.publish(VALID, merge=False)
        publisher.write_error = error
        with pytest.raises(type(error)):
            publisher.publish({"endpoints": {}, "custom": 2}, merge=False)
        assert publisher.data() == VALID, "the loop keeps writing what was last accepted"

    def test_nothing_is_written_once_deregistration_began(self, publisher: Scripted) -> None:
        publisher.start()
        assert publisher.held.wait(DEADLINE)
        assert publisher.deregister(timeout=2) is True and publisher.withdrawn == [2]
        assert publisher.state is PublisherState.DEREGISTERING and not publisher.registered.is_set()
        with pytest.raises(Unavailable, match="deregistering"):
            publisher.publish(VALID, merge=False)
        assert publisher.writes == []

    def test_superseded_is_final_and_says_why(self, publisher: Scripted) -> None:
        """Superseded even while deregistering (the check before the withdrawal may find it); never left."""
        assert publisher._enter(PublisherState.SUPERSEDED, "this pod incarnation no longer exists") != ""
        assert publisher._enter(PublisherState.WATCH_ONLY, "another writer") == ""
        assert publisher.superseded and publisher.problems() == ["this pod incarnation no longer exists"]
        with pytest.raises(RegistrationError, match="no longer exists"):
            publisher.publish(VALID, merge=False)


class TestHealth:
    """What the loop tells ``health`` (logs, metrics, the stream's status), and in which order."""

    def test_told_before_registered_is_set(self, publisher: Scripted) -> None:
        """Whoever sees "registered" sees the stream told: the listener runs before the event is set."""
        told: list[tuple[bool, str, bool]] = []
        publisher.health.listener = lambda healthy, reason: told.append(
            (healthy, reason, publisher.registered.is_set())
        )
        publisher.establishes.put(Unavailable("cannot reach the store (scripted)"))
        publisher.start()
        assert publisher.held.wait(DEADLINE)
        assert told == [
            (False, "cannot reach the store (scripted)", False),
            (True, "", False),
        ]

    def test_a_transient_failure_keeps_registered_one_that_needs_a_human_does_not(self, publisher: Scripted) -> None:
        """Unavailable after registering: the registration most likely still stands (readiness stays);
        forbidden: not registered, and that is why; a failure while the registration is known lost: not
        registered either."""
        seen: list[tuple[bool, list[str]]] = []
        failed = publisher._failed

        def recording(message: str, needs_human: bool) -> None:
            failed(message, needs_human)
            seen.append((publisher.registered.is_set(), publisher.problems()))

        publisher._failed = recording  # type: ignore[method-assign]
        publisher.start()
        assert publisher.held.wait(DEADLINE)
        publisher.held.clear()
        publisher.establishes.put(Unavailable("cannot reach the store (scripted)"))
        publisher.establishes.put(Forbidden("forbidden to register (scripted)"))
        publisher._wake.set()
        assert publisher.held.wait(DEADLINE)
        publisher.held.clear()
        publisher.health.lost("deleted", "it was deleted (scripted)")
        publisher.establishes.put(Unavailable("cannot reach the store (scripted)"))
        publisher._wake.set()
        assert publisher.held.wait(DEADLINE)
        assert seen == [
            (True, []),
            (False, ["not registered: forbidden to register (scripted)"]),
            (False, ["not registered: cannot reach the store (scripted)"]),
        ]
        assert publisher.registered.is_set() and not publisher.health.is_lost

    def test_blocked_is_waited_out_without_backoff_then_registered(self, publisher: Scripted) -> None:
        """Blocked: not registered and why (readiness, the stream), no backoff; the loop looks again when
        woken (the own watch saw the end of it), then registers and says it no longer waits."""
        told: list[tuple[bool, str]] = []
        publisher.health.listener = lambda healthy, reason: told.append((healthy, reason))
        publisher.establishes.put(Blocked("waiting for the old object to go (scripted)"))
        publisher.start()
        wait_for(lambda: publisher.state is PublisherState.BLOCKED, DEADLINE, "blocked")
        assert publisher.problems() == ["not registered: waiting for the old object to go (scripted)"]
        assert told == [(False, "waiting for the old object to go (scripted)")]
        assert publisher.backoff.attempts == 0 and not publisher.registered.is_set()
        assert publisher.metrics is not None
        assert publisher.metrics.registry.get_sample_value("discovery_registration_blocked") == 1
        with pytest.raises(Blocked):  # publishing meets the same wait (the backend says so); nothing written
            publisher.write_error = Blocked("waiting for the old object to go (scripted)")
            publisher.publish(VALID, merge=False)
        publisher.write_error = None
        publisher._wake.set()
        assert publisher.held.wait(DEADLINE)
        assert publisher.state is PublisherState.REGISTERED and publisher.problems() == []
        assert told[-1] == (True, "")
        assert publisher.metrics.registry.get_sample_value("discovery_registration_blocked") == 0

    def test_a_final_state_and_the_deregistration_forget_what_was_failing(self, publisher: Scripted) -> None:
        """Nothing written any more: no outage to report, the stream is not left DEGRADED for it."""
        told: list[tuple[bool, str]] = []
        publisher.health.listener = lambda healthy, reason: told.append((healthy, reason))
        publisher.establishes.put(Blocked("waiting (scripted)"))
        publisher.start()
        wait_for(lambda: told, DEADLINE, "blocked, and the stream told")
        assert publisher._enter(PublisherState.WATCH_ONLY, "watch-only: another writer (scripted)")
        wait_for(lambda: told[-1] == (True, ""), DEADLINE, "forgotten")
        assert publisher.health.blocking() == ""

        other = Scripted()
        other.health.listener = lambda healthy, reason: told.append((healthy, reason))

        def forbidden() -> None:
            raise Forbidden("forbidden (scripted)")

        other._establish = forbidden  # type: ignore[method-assign]
        other.start()
        try:
            wait_for(lambda: told[-1] == (False, "forbidden (scripted)"), DEADLINE, "failing")
            assert other.deregister(timeout=1) is True
            assert told[-1] == (True, "")
        finally:
            other.stop()
