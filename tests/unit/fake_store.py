"""A ``SourceStore`` that records what it is told, for every source's tests (Kubernetes and etcd).

``RecordingStore`` implements ``sidecar.peers.ports.SourceStore``; tests wait, with a deadline, for a
condition on what it recorded (``wait_for``) instead of sleeping, or read the state the calls add up to
(``records``, ``health``, ``replaced``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.records import Record

DEADLINE = 5.0
"""How long a test waits for something that should happen at once (generous: only failures wait it out)."""


@dataclass(frozen=True)
class StoreCall:
    """One call into the store (or a ``note`` a test added to the same timeline)."""

    op: str  # "upsert", "delete", "replace", "set_health", or a test's own note
    key: str = ""
    record: Record | None = None
    records: Mapping[str, Record] = field(default_factory=dict)
    healthy: bool | None = None
    reason: str = ""
    detail: Any = None


class RecordingStore:
    """A ``SourceStore`` that records every call, in order, and lets tests wait for what they expect."""

    def __init__(self) -> None:
        self.calls: list[StoreCall] = []
        self._cond = threading.Condition()

    def _record(self, call: StoreCall) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    # -- SourceStore ------------------------------------------------------------------------------
    def upsert(self, key: str, record: Record, received: float | None = None) -> None:
        self._record(StoreCall("upsert", key=key, record=record))

    def delete(self, key: str, received: float | None = None) -> None:
        self._record(StoreCall("delete", key=key))

    def replace(self, records: Mapping[str, Record], received: float | None = None) -> int:
        self._record(StoreCall("replace", records=dict(records)))
        return len(records)

    def set_health(self, healthy: bool, reason: str = "") -> None:
        self._record(StoreCall("set_health", healthy=healthy, reason=reason))

    # -- for tests --------------------------------------------------------------------------------
    def note(self, op: str, key: str = "", detail: Any = None) -> None:
        """Add a test's own entry to the timeline (an observer saying it was called, say)."""
        self._record(StoreCall(op, key=key, detail=detail))

    def snapshot(self) -> list[StoreCall]:
        with self._cond:
            return list(self.calls)

    def ops(self) -> list[str]:
        return [c.op for c in self.snapshot()]

    def of(self, op: str) -> list[StoreCall]:
        return [c for c in self.snapshot() if c.op == op]

    def wait_for(
        self, predicate: Callable[[Sequence[StoreCall]], bool], what: str = "", timeout: float = DEADLINE
    ) -> list[StoreCall]:
        """Block until ``predicate(calls)`` holds; return the calls. Fails the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.calls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"store never saw {what or predicate} within {timeout}s: {self.calls}")
                self._cond.wait(remaining)
            return list(self.calls)

    def wait_for_ops(self, op: str, count: int, timeout: float = DEADLINE) -> list[StoreCall]:
        """Block until ``op`` was called ``count`` times; return those calls."""
        calls = self.wait_for(lambda cs: sum(c.op == op for c in cs) >= count, f"{count} x {op}", timeout)
        return [c for c in calls if c.op == op]

    # -- the state the calls add up to ------------------------------------------------------------
    @property
    def records(self) -> dict[str, Record]:
        """The source's current set as the store would hold it: the last replace, then upserts and deletes."""
        state: dict[str, Record] = {}
        for call in self.snapshot():
            if call.op == "replace":
                state = dict(call.records)
            elif call.op == "upsert" and call.record is not None:
                state[call.key] = call.record
            elif call.op == "delete":
                state.pop(call.key, None)
        return state

    @property
    def health(self) -> list[bool]:
        """Every health report, in order."""
        return [bool(c.healthy) for c in self.of("set_health")]

    @property
    def replaced(self) -> int:
        """How many times the source replaced its whole set (a list or relist)."""
        return len(self.of("replace"))
