"""The thread every peer source runs in, whatever it watches (a Kubernetes reflector, the etcd watch).

What is the same for every source lives here once: the thread and how it is stopped (the open stream is
closed from the stopping thread, so a blocked read ends at once), the store told about health only on
a transition (healthy -> unhealthy with the reason, and back), and the jittered backoff between failed
attempts. What the source lists and watches, and what its failures mean, is the subclass's.

Logs follow urgency: an outage is one warning when it starts and one info line when the source reaches
its origin again (with how long it lasted and how many attempts failed); the attempts in between are
debug lines (the subclass counts them in metrics). A failure that needs a human (forbidden, a resource
that is not served) is an error, logged again only when its reason changes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from sidecar.core.backoff import Backoff
from sidecar.peers.ports import SourceStore


class Closable(Protocol):
    def close(self) -> None: ...


class SourceLoop:
    """Owns a source's thread, its stop event, its open stream (``_stream_lock`` guards it: ``stop`` reads
    it from another thread), its health flag (the loop's thread only) and its backoff."""

    def __init__(self, store: SourceStore, log: Any, backoff_max: float, thread_name: str) -> None:
        self.store = store
        self.log = log
        self.backoff = Backoff(maximum=backoff_max)
        self._thread_name = thread_name
        self._stop = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Closable | None = None
        self._healthy = True
        # The current outage, for its log lines (the loop's thread only): when it began, the failed attempts,
        # and the reason last logged at error level.
        self._outage_since = 0.0
        self._outage_attempts = 0
        self._human_reason = ""
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run in a background thread; return it (the daemon's liveness probe watches it)."""
        self._thread = threading.Thread(target=self.run, name=self._thread_name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        raise NotImplementedError

    # -- for the loop -------------------------------------------------------------------------------
    def _hold_stream(self, stream: Closable | None) -> None:
        """The stream ``stop`` must close (None once it is closed by the loop itself)."""
        with self._stream_lock:
            self._stream = stream

    def _retry_later(self, message: str, reason: str, hint: str | None, needs_human: bool = False) -> None:
        """A failed attempt: report the source unhealthy, wait the backoff (or stop).

        Logged at warning on the first failure of an outage, at error when it needs a human (once per
        reason), at debug otherwise.
        """
        delay = self.backoff.next_delay()
        first = self._healthy
        if first:
            self._outage_since = time.monotonic()
            self._outage_attempts = 0
            self._human_reason = ""
        self._outage_attempts += 1
        fields = {"reason": reason, "hint": hint or None, "retry_in": round(delay, 2)}
        if needs_human and reason != self._human_reason:
            self._human_reason = reason
            self.log.error(message, **fields)
        elif first:
            self.log.warning(message, **fields)
        else:
            self.log.debug(message, attempts=self._outage_attempts, **fields)
        if self._healthy:
            self._healthy = False
            self.store.set_health(False, reason)
        self._stop.wait(delay)

    def _report_healthy(self, message: str) -> None:
        """The source reaches its origin again (logged once per recovery, with the outage's length)."""
        if not self._healthy:
            self._healthy = True
            self.log.info(
                message,
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
                failed_attempts=self._outage_attempts,
            )
            self.store.set_health(True)
