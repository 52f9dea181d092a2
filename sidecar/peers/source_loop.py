"""The thread every peer source runs in, whatever it watches (a Kubernetes reflector, the etcd watch).

What is the same for every source lives here once: the thread and how it is stopped (the open stream is
closed from the stopping thread, so a blocked read ends at once), the store told about health only on
a transition (healthy -> unhealthy with the reason, and back), and the jittered backoff between failed
attempts. What the source lists and watches, and what its failures mean, is the subclass's.
"""

from __future__ import annotations

import threading
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
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Run in a background thread; return it (the daemon's liveness probe watches it)."""
        self._thread = threading.Thread(target=self.run, name=self._thread_name, daemon=True)
        self._thread.start()
        return self._thread

    @property
    def running(self) -> bool:
        """Started and not stopped: the source is (or is trying to be) watching its origin."""
        return self._thread is not None and not self._stop.is_set()

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

    def _retry_later(self, message: str, reason: str, hint: str | None) -> None:
        """A failed attempt: log it with the hint, report the source unhealthy, wait the backoff (or stop)."""
        delay = self.backoff.next_delay()
        self.log.warning(message, reason=reason, hint=hint or None, retry_in=round(delay, 2))
        if self._healthy:
            self._healthy = False
            self.store.set_health(False, reason)
        self._stop.wait(delay)

    def _report_healthy(self, message: str) -> None:
        """The source reaches its origin again (logged once per recovery)."""
        if not self._healthy:
            self._healthy = True
            self.log.info(message)
            self.store.set_health(True)
