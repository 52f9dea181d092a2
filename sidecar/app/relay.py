"""``discovery-sidecar relay``: one set of watches, served to many sidecars over TLS.

With every pod watching the API server, a rollout costs it O(P²) (bench/COST_MODEL.md). A relay runs the
same core as a sidecar (the Kubernetes reflectors, the pod-UID join, the hub and its log) for a set of
namespaces, watching from start-up, and serves the result over the same ``WatchPeers`` and ``ListPeers``
a main container uses; sidecars follow it (``DISCOVERY_UPSTREAM``) instead of watching, so the API
server carries one watch per relay replica. It registers nothing and has no pod identity to speak of.

Every call is authenticated and authorised against the API server (``sidecar.kube.access`` through the
``Access`` port): a client sees the namespaces its own token may list, nothing more. Replicas are
interchangeable (each has its own history, so a sidecar that moves to another one gets a snapshot and
diffs it: ``sidecar.kube.upstream``). Ready once every watch has listed; a lost API server afterwards
keeps it ready and its streams say DEGRADED, as a sidecar's do.
"""

from __future__ import annotations

import threading
import time

import structlog

from sidecar import __version__
from sidecar.app import collector
from sidecar.app.backends import build_relay
from sidecar.app.config import RelaySettings
from sidecar.app.lifecycle import serve_once_synced, stop_on_signals
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import PodIdentity
from sidecar.peers.reporting import PeerChangeReporter
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import DiscoveryService
from sidecar.serve.http_server import HttpServer

RELAY_MAX_STREAMS = 8192
"""Streams one relay replica serves (one per following sidecar, ~35 KiB each: ~280 MiB at the limit)."""


class Relay:
    """Owns the relay's parts and their order of start and stop; the CLI's ``relay`` (and in-process
    tests) construct it. ``transport``: an already-made ``KubeApi`` (tests)."""

    def __init__(self, settings: RelaySettings, transport: object | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar.relay")
        self.metrics = Metrics()
        self.backend = build_relay(settings, settings.kube, self.metrics, settings.access_ttl, transport)
        self.hub = self.backend.hub
        self.hub.subscribe(PeerChangeReporter(self.log, self.metrics))
        service = DiscoveryService(
            self.hub,
            None,
            PodIdentity("", settings.namespace, ""),
            self.metrics,
            max_streams=RELAY_MAX_STREAMS,
            access=self.backend.access,
        )
        self.grpc = GrpcServer(service, settings.listen, tls=settings.tls)
        self.http = (
            HttpServer(
                settings.http_listen,
                self.hub,
                self.metrics,
                self.liveness_problems,
                self.readiness_problems,
                settings.debug_peers,
            )
            if settings.http_listen is not None
            else None
        )
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def readiness_problems(self) -> list[str]:
        """Ready once every watch has listed (an empty set then means none); never unready for an API server
        lost afterwards (its streams say DEGRADED, and sidecars keep their peers)."""
        problems = []
        if self._stopping.is_set():
            problems.append("shutting down")
        if not self.hub.synced:
            problems.append("watches not synced yet")
            problems.extend(f"{source}: {reason}" for source, reason in self.hub.source_health().items())
        problems.extend(self.liveness_problems())
        return problems

    def liveness_problems(self) -> list[str]:
        if self._stopping.is_set():
            return []
        return [f"thread {t.name} has died" for t in self._threads if not t.is_alive()]

    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        self._threads = [source.start() for source in self.backend.sources]
        serve_once_synced(self.hub, self.grpc, self.log)
        self.log.info(
            "relay started",
            version=__version__,
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            watches=list(self.backend.descriptions),
            history_id=self.hub.history_id,
        )
        collector.settle()  # start-up is over: what it built lives as long as the process

    def shutdown(self) -> None:
        """End every stream with UNAVAILABLE (sidecars move to another replica), then stop the watches."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        collector.release()  # the gRPC server's cycles must be collectable when it stops
        started = time.monotonic()
        self.hub.close()
        self.grpc.stop(grace=min(2.0, self.settings.shutdown_timeout))
        for source in self.backend.sources:
            source.stop(timeout=2)
        if self.http is not None:
            self.http.stop()
        self.backend.close()
        self.log.info("stopped", seconds=round(time.monotonic() - started, 2))

    def run_until_signalled(self) -> int:
        stop = stop_on_signals(self.log)
        self.start()
        stop.wait()
        self.shutdown()
        return 0
