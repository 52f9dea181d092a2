"""Keeps SGLang Model Gateway's worker manifest file equal to the peer set (``DISCOVERY_SMG_MANIFEST``).

A hub reader like the gRPC streams: it sleeps until the hub's change signal wakes it (new entries, the
sync, the hub closing), recomputes the document with the pure ``sidecar.core.smg_manifest`` and replaces
the file when, and only when, its text changed. SMG re-reads
the file as soon as it changes, so every rule here is about never showing SMG a wrong or partial set:

* nothing is written before the sidecar has synced (an empty manifest then would deregister every
  worker SMG may already know from an earlier file);
* the file is replaced atomically: written to a temporary file in the same directory (the shared
  volume), flushed, then renamed over the manifest, so SMG never reads half a file;
* while the API server is lost (status DEGRADED) the last good file stays as it is; once the watches
  are back and relisted, the current set is written.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import threading
from typing import Any

from sidecar.core.eventlog import ApiStatus
from sidecar.core.smg_manifest import SmgManifestSettings, manifest_text, smg_manifest
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import PeerReader

RETRY_SECONDS = 2.0
"""How soon a failed write (a full or read-only volume) is tried again, besides on the next change: the
only timed wake-up, and only while a write is failing."""


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename; readers see the old file or the new, never a mix."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # SMG may run as another user sharing the volume
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class SmgManifestWriter:
    """Owns the manifest file and the thread that writes it; the daemon starts and stops it.

    ``_wake`` is set by the hub's change signal (in the writer's thread) and by ``stop``; the thread
    clears it before it reads the hub, so a change during a write wakes it again. ``_problem`` (why the
    last write failed, or None) and ``written_once`` are read by the readiness probe from another thread;
    single reference assignments, so they need no lock.
    """

    def __init__(
        self, reader: PeerReader, settings: SmgManifestSettings, log: Any, metrics: Metrics | None = None
    ) -> None:
        self.reader = reader
        self.metrics = metrics if metrics is not None else Metrics()
        self.settings = settings
        self.log = log.bind(manifest=str(settings.path))
        self._stop = threading.Event()
        self._wake = threading.Event()
        reader.subscribe(lambda _change: self._wake.set())
        self._problem: str | None = None
        self._written: str | None = self._current_text()
        self.writes = 0  # files written by this process (tests and the debug log read it)
        # The file holds this process's peer set (written, or found as it would be written): read by readiness.
        self.written_once = False
        self.seen_revision = -1  # the last revision considered (written, unchanged, or held while degraded)

    def _current_text(self) -> str | None:
        try:
            return self.settings.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def problems(self) -> list[str]:
        """Why the gateway should not take traffic: its manifest was never written for this peer set (SMG would
        have no workers), or the last write failed."""
        if self._problem is not None:
            return [f"SMG manifest: {self._problem}"]
        if not self.written_once:
            return ["SMG manifest: not written yet (waiting for the first sync of the peers)"]
        return []

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="smg-manifest", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        revision = -1
        while True:
            self._wake.clear()  # before reading: a change from here on sets it again
            if self._stop.is_set() or self.reader.closed:
                return
            if self.reader.synced:  # nothing is written before the sync: an empty file would drop every worker
                state = self.reader.state()
                # Held while a source is unhealthy (the peer set may be stale); DEGRADED for this pod's own
                # registration alone says nothing about the peers.
                current = state.status.status is ApiStatus.CONNECTED or not self.reader.source_health()
                if current and (state.revision != revision or self._problem or not self.written_once):
                    revision = state.revision
                    self._sync(smg_manifest(state.peers, self.settings.roles), revision)
                self.seen_revision = state.revision
            self._wake.wait(RETRY_SECONDS if self._problem else None)

    def _sync(self, manifest: dict[str, Any], revision: int) -> None:
        text = manifest_text(manifest)
        if text == self._written:
            self.written_once = True
            return
        try:
            write_atomically(self.settings.path, text)
        except OSError as exc:
            self.metrics.smg_manifest_writes.labels("error").inc()
            problem = f"cannot write {self.settings.path}: {exc.strerror or exc}"
            if problem != self._problem:  # retried every few seconds: say it once, and again if it changes
                self.log.error("SMG manifest not written; the last good file stays", error=problem)
            self._problem = problem
            return
        self._written = text
        self._problem = None
        self.written_once = True
        self.writes += 1
        self.metrics.smg_manifest_writes.labels("ok").inc()
        self.metrics.smg_manifest_workers.set(len(manifest["workers"]))
        self.log.info("SMG manifest written", workers=len(manifest["workers"]), revision=revision)
