"""``discovery-sidecar run``: build the chosen backend, wire it to the pod-facing layer, run until SIGTERM.

Two backends, one serving layer. The daemon asks ``sidecar.app.backends`` to build the configured one
(``sidecar.peers.backend.Backend``: the hub, the sources that feed it, this pod's publisher, the
transport) and never learns which it is: on Kubernetes the sources are reflectors and the publisher is
this pod's CR, on etcd the source is the watch of Dynamo's ``v1/`` prefixes and the publisher is this
instance's lease. The gRPC service, the HTTP server and the SMG writer read the hub through
``sidecar.peers.ports`` only, so the main container is served the same way whichever backend is
configured.

Whatever ``DISCOVERY_WATCH`` says, the publisher runs from start-up with the watch of its own
registration (``Backend.own_watches``: its CR alone, or its keys and lease), so a registration deleted
or altered from under an idle pod is restored at once. Start-up never crashes on an unreachable API
server: the watches and the publisher retry with backoff while ``/readyz`` says what is missing. (On
etcd, as in Dynamo's runtime, the first connection must succeed within
``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS``, else the process exits 1: ``Backend.wait_reachable``.)
Shutdown runs in the order peers and the main container need: deregister first (peers see this pod
leave: the CR deleted, or the lease revoked; the own watch confirms it), then end the streams (clients
are told UNAVAILABLE and can resume against the next sidecar), then stop the watches.
"""

from __future__ import annotations

import threading
import time

import structlog

from sidecar import __version__
from sidecar.app import collector
from sidecar.app.backends import build
from sidecar.app.config import Settings
from sidecar.app.lifecycle import serve_once_synced, stop_on_signals
from sidecar.peers.backend import StartupError
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import WatchMode
from sidecar.peers.reporting import PeerChangeReporter
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import DiscoveryService
from sidecar.serve.http_server import HttpServer
from sidecar.serve.smg_writer import SmgManifestWriter


class Sidecar:
    """Owns every part of one running sidecar and their order of start and stop; the CLI's ``run``
    (and in-process tests) construct it. The backend's parts come from its ``build``; ``transport``, an
    already-made client of the configured backend, is for tests."""

    def __init__(self, settings: Settings, transport: object | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)
        self.metrics = Metrics()
        self.backend = build(settings.backend, settings, settings.backend_settings, self.metrics, transport)
        self.hub = self.backend.hub
        self.publisher = self.backend.publisher
        self.hub.subscribe(PeerChangeReporter(self.log, self.metrics))
        self.smg_writer = (
            SmgManifestWriter(self.hub, settings.smg_manifest, self.log, self.metrics)
            if settings.smg_manifest is not None
            else None
        )
        self.grpc = GrpcServer(
            DiscoveryService(self.hub, self.publisher, settings.identity, self.metrics), settings.grpc_listen
        )
        self.http = (
            HttpServer(
                settings.http_listen,
                self.hub,
                self.metrics,
                self.liveness_problems,
                self.readiness_problems,
                settings.debug_peers,
                readiness_notes=lambda: list(self.publisher.notes()),
            )
            if settings.http_listen is not None
            else None
        )
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_lock = threading.Lock()  # guards _watching and _threads
        self._watching = False

    # -- probes -----------------------------------------------------------------------------------------
    def readiness_problems(self) -> list[str]:
        """Why this pod should not be in its Service's endpoints now (empty: ready).

        Ready means discoverable: registered, as its own. With ``DISCOVERY_WATCH=always`` (routers and
        frontends, which serve from the peer set) also synced once, so that no request meets an empty set
        that only means "not loaded yet". Nothing else: starting the watches on a first peer request
        (``auto``) never changes readiness (the pod would leave its Service's endpoints and every peer would
        see it go and come back), and neither does an API server lost after the first sync (the peer set is
        kept and the stream says DEGRADED; failing every router's readiness at once would turn a control
        plane outage into a data plane one). A dead thread fails it too: peers it fed would silently go stale.
        """
        problems = []
        if self._stopping.is_set():
            problems.append("shutting down")
        problems.extend(self.publisher.problems())
        if self.smg_writer is not None:
            problems.extend(self.smg_writer.problems())
        if self.settings.watch is WatchMode.ALWAYS and not self.hub.synced:
            problems.append("watches not synced yet")
            problems.extend(f"{source}: {reason}" for source, reason in self.hub.source_health().items())
        problems.extend(self.liveness_problems())
        return problems

    def liveness_problems(self) -> list[str]:
        if self._stopping.is_set():
            return []
        with self._watch_lock:
            threads = list(self._threads)
        return [f"thread {t.name} has died" for t in threads if not t.is_alive()]

    @property
    def watching(self) -> bool:
        with self._watch_lock:
            return self._watching

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        with self._watch_lock:
            # The registration and its own watch, whatever DISCOVERY_WATCH says.
            self._threads = [self.publisher.start(), *(watch.start() for watch in self.backend.own_watches)]
        mode = self.settings.watch
        if self.smg_writer is not None:
            # The manifest is a standing request for peers: it starts the watches at once (never is refused
            # with a manifest at start-up).
            with self._watch_lock:
                self._threads.append(self.smg_writer.start())
            self._start_watches("the SMG manifest writer")
        if mode is WatchMode.ALWAYS:
            self._start_watches("DISCOVERY_WATCH=always")
            serve_once_synced(self.hub, self.grpc, self.log)
        else:
            # Nothing is watched until asked (auto) or ever (never): the API answers at once; peer requests
            # start the watches and wait for the sync within their deadline, or are refused.
            if mode is WatchMode.AUTO:
                self.hub.watch_on_demand(lambda: self._start_watches("the first request for peers"))
            else:
                self.hub.refuse_peers(
                    "this sidecar does not watch peers (DISCOVERY_WATCH=never): it only registers this pod; "
                    "set DISCOVERY_WATCH=auto or always on pods that read peers"
                )
            self.grpc.set_serving(True)
        self.log.info(
            "started",
            version=__version__,  # which build runs: an upgrade (a restart with a new build) shows here
            backend=self.backend.name,
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            watch_mode=mode,
            watches=list(self.backend.descriptions),
            history_id=self.hub.history_id,
        )
        collector.settle()  # start-up is over: what it built lives as long as the process

    def _start_watches(self, why: str) -> None:
        """Start every watch, once: at start-up (always) or on the first peer request (auto)."""
        with self._watch_lock:
            if self._watching or self._stopping.is_set():
                return
            self._watching = True
            self._threads.extend(source.start() for source in self.backend.sources)
        self.log.info("watching peers", reason=why, watches=len(self.backend.sources))

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        collector.release()  # the gRPC server's cycles must be collectable when it stops
        budget = self.settings.shutdown_timeout
        started = time.monotonic()
        self.log.info("shutting down: deregistering first", budget_seconds=budget)
        confirmed = self.publisher.deregister(timeout=budget * 0.6)
        if self.smg_writer is not None:
            self.smg_writer.stop()  # the file stays: SMG keeps its workers while this pod shuts down
        self.hub.close()
        self.grpc.stop(grace=min(2.0, max(0.1, budget - (time.monotonic() - started))))
        for source in [*self.backend.sources, *self.backend.own_watches]:
            source.stop(timeout=2)
        if self.http is not None:
            self.http.stop()
        self.backend.close()
        self.log.info("stopped", deregistration_confirmed=confirmed, seconds=round(time.monotonic() - started, 2))

    def run_until_signalled(self) -> int:
        stop = stop_on_signals(self.log)
        try:
            reached = self.backend.wait_reachable(stop)
        except StartupError as exc:
            self.log.error("cannot start", reason=str(exc))
            self.backend.close()
            return 1
        if not reached:
            self.backend.close()
            return 0
        self.start()
        stop.wait()
        self.shutdown()
        return 0
