"""RegistrationHealth: each change of the registration said once, at the level its urgency calls for."""

from __future__ import annotations

from typing import Any

import structlog

from sidecar.peers.metrics import Metrics
from sidecar.peers.registration_health import RegistrationHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.health = RegistrationHealth(structlog.get_logger("test"), self.metrics, clock=self.clock)
        self.told: list[tuple[bool, str]] = []
        self.health.listener = lambda healthy, reason: self.told.append((healthy, reason))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def levels(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["log_level"]) for e in logs]


class TestLostAndRestored:
    def test_a_loss_is_one_warning_and_its_restore_one_info_line_with_how_long(self) -> None:
        """Lost twice before being restored: one warning, one debug; restored: info with the seconds; the
        stream is not told (a restore within a second is no outage)."""
        rig = Rig()
        with structlog.testing.capture_logs() as logs:
            rig.health.lost("deleted", "it was deleted", uid="u1")
            rig.health.lost("deleted", "it was deleted again", uid="u1")
            rig.clock.now += 0.25
            rig.health.in_place(resource_version="7")
        assert levels(logs) == [
            ("registration lost; restoring it", "warning"),
            ("registration lost again before it was restored", "debug"),
            ("registration restored", "info"),
        ]
        assert logs[2]["seconds"] == 0.25 and logs[2]["reason"] == "deleted"
        assert rig.sample("discovery_registration_lost_total", reason="deleted") == 2
        assert rig.sample("discovery_registration_restored_total", reason="deleted") == 1
        assert rig.sample("discovery_registration_restore_seconds_sum") == 0.25
        assert rig.told == []
        assert not rig.health.is_lost

    def test_in_place_without_anything_going_on_says_nothing(self) -> None:
        rig = Rig()
        with structlog.testing.capture_logs() as logs:
            rig.health.in_place()
        assert logs == [] and rig.told == []


class TestBlocked:
    def test_blocked_is_a_warning_per_reason_degraded_and_the_readiness_reason(self) -> None:
        rig = Rig()
        with structlog.testing.capture_logs() as logs:
            rig.health.blocked("held by finalizer(s) example.com/hold")
            rig.health.blocked("held by finalizer(s) example.com/hold")
            rig.health.blocked("held by finalizer(s) example.com/other")
        assert levels(logs) == [("registration waiting", "warning")] * 2
        assert rig.health.blocking() == "held by finalizer(s) example.com/other"
        assert rig.sample("discovery_registration_blocked") == 1
        assert rig.told == [
            (False, "held by finalizer(s) example.com/hold"),
            (False, "held by finalizer(s) example.com/other"),
        ]
        with structlog.testing.capture_logs() as logs:
            rig.health.in_place()
        assert levels(logs) == [("registration no longer waiting", "info")]
        assert rig.health.blocking() == "" and rig.sample("discovery_registration_blocked") == 0
        assert rig.told[-1] == (True, "")


class TestFailing:
    def test_a_transient_outage_is_one_warning_then_debug_then_one_info(self) -> None:
        rig = Rig()
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                rig.health.failed("cannot reach the API server", needs_human=False)
                rig.clock.now += 2
            rig.health.in_place()
        assert levels(logs) == [
            ("registration failing; retrying", "warning"),
            ("registration still failing", "debug"),
            ("registration still failing", "debug"),
            ("registration works again", "info"),
        ]
        assert logs[-1]["failed_attempts"] == 3 and logs[-1]["outage_seconds"] == 6
        assert rig.told == [(False, "cannot reach the API server"), (True, "")]

    def test_what_needs_a_human_is_an_error_once_per_reason(self) -> None:
        rig = Rig()
        with structlog.testing.capture_logs() as logs:
            rig.health.failed("forbidden to register", needs_human=True)
            rig.health.failed("forbidden to register", needs_human=True)
            rig.health.failed("the CRD is not installed", needs_human=True)
        assert levels(logs) == [
            ("registration failed: this needs a human", "error"),
            ("registration still failing", "debug"),
            ("registration failed: this needs a human", "error"),
        ]

    def test_forget_ends_everything_without_a_word(self) -> None:
        rig = Rig()
        rig.health.blocked("held")
        rig.health.failed("x", needs_human=False)
        with structlog.testing.capture_logs() as logs:
            rig.health.forget()
        assert logs == [] and rig.health.blocking() == "" and rig.told[-1] == (True, "")
