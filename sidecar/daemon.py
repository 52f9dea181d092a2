"""``discovery-sidecar run``: wire the pieces together and run them until SIGTERM.

Start-up never crashes on an unreachable API server: the watches and the registrar retry with
backoff while ``/readyz`` says what is missing. Shutdown runs in the order peers and the main
container need: deregister first (peers see this pod leave), then end the streams (clients are told
UNAVAILABLE and can resume against the next sidecar), then stop the watches.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from types import FrameType

import structlog

from sidecar.config import Settings
from sidecar.core.directory import ENDPOINT_SLICES, WORKER_METADATA, PeerDirectory
from sidecar.core.eventlog import ApiStatus, LogEntry, PeerChange, StatusChange
from sidecar.grpc_service import DiscoveryService, GrpcServer
from sidecar.http_server import HttpServer
from sidecar.hub import PeerHub
from sidecar.kube.api import KubeApi, ResourcePath
from sidecar.kube.reflector import Reflector, WatchTarget
from sidecar.kube.registration import WORKER_METADATA as WORKER_METADATA_PATH
from sidecar.kube.registration import Registrar
from sidecar.metrics import Metrics

ENDPOINT_SLICES_PATH = ResourcePath("discovery.k8s.io", "v1", "endpointslices")


class Sidecar:
    def __init__(self, settings: Settings, api: KubeApi | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)
        self.api = api or KubeApi.from_kubeconfig(settings.kubeconfig, settings.request_timeout)
        self.metrics = Metrics()
        self.api.on_request = lambda method, code: self.metrics.api_requests.labels(method, str(code)).inc()
        self.api.on_bytes = self.metrics.api_bytes.inc
        directory = PeerDirectory(history_id=uuid.uuid4().hex, history_capacity=settings.history_size)
        self.hub = PeerHub(directory, self_uid=settings.identity.uid)
        self.hub.add_listener(self._on_entries)
        self.registrar = Registrar(
            self.api,
            settings.identity,
            settings.pod_labels,
            settings.initial_metadata,
            settings.field_manager,
            self.metrics,
            settings.backoff_max,
        )
        namespace = settings.identity.namespace
        common = dict(silence_timeout=settings.watch_silence_timeout, backoff_max=settings.backoff_max)
        self.reflectors = [
            Reflector(
                self.api,
                WatchTarget(ENDPOINT_SLICES, ENDPOINT_SLICES_PATH, namespace, str(settings.endpointslice_selector)),
                self.hub,
                self.metrics,
                **common,
            ),
            Reflector(
                self.api,
                WatchTarget(WORKER_METADATA, WORKER_METADATA_PATH, namespace),
                self.hub,
                self.metrics,
                observers=[self.registrar.observe],
                **common,
            ),
        ]
        self.grpc = GrpcServer(
            DiscoveryService(self.hub, self.registrar, settings.identity, self.metrics), settings.grpc_listen
        )
        self.http = (
            HttpServer(settings.http_listen, self.hub, self.metrics, self.liveness_problems, self.readiness_problems)
            if settings.http_listen is not None
            else None
        )
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- probes -----------------------------------------------------------------------------------------
    def readiness_problems(self) -> list[str]:
        problems = []
        if self._stopping.is_set():
            problems.append("shutting down")
        if not self.registrar.registered.is_set():
            problems.append("not registered" + (f": {self.registrar.last_error}" if self.registrar.last_error else ""))
        if not self.hub.synced:
            problems.append("watches not synced yet")
        problems.extend(f"{source}: {reason}" for source, reason in self.hub.source_health().items())
        return problems

    def liveness_problems(self) -> list[str]:
        if self._stopping.is_set():
            return []
        return [f"thread {t.name} has died" for t in self._threads if not t.is_alive()]

    # -- events -----------------------------------------------------------------------------------------
    def _on_entries(self, entries: list[LogEntry]) -> None:
        for entry in entries:
            change = entry.change
            if isinstance(change, StatusChange):
                self.metrics.api_connected.set(1 if change.status is ApiStatus.CONNECTED else 0)
                if change.status is ApiStatus.DEGRADED:
                    self.log.warning(
                        "API server unreachable: peer set may be stale", reason=change.reason, revision=entry.revision
                    )
                else:
                    self.log.info("API server reachable: peer set is current", revision=entry.revision)
                continue
            assert isinstance(change, PeerChange)
            self.metrics.peer_changes.inc()
            if change.before is not None:
                self.metrics.peers.labels(change.before.state.value).dec()
            if change.after is not None:
                self.metrics.peers.labels(change.after.state.value).inc()
            peer = change.after or change.before
            assert peer is not None
            event = (
                "peer added" if change.before is None else "peer removed" if change.after is None else "peer updated"
            )
            # Additions and removals are what operators look for; updates (metadata churn) can be many.
            emit = self.log.debug if event == "peer updated" else self.log.info
            emit(
                event,
                peer=peer.name,
                uid=peer.uid,
                state=(change.after or peer).state.value,
                addresses=list(peer.addresses),
                revision=entry.revision,
            )

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        self._threads = [reflector.start() for reflector in self.reflectors]
        self._threads.append(self.registrar.start())
        threading.Thread(target=self._mark_serving_when_synced, name="health", daemon=True).start()
        self.log.info(
            "started",
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            endpointslice_selector=str(self.settings.endpointslice_selector),
            history_id=self.hub.history_id,
        )

    def _mark_serving_when_synced(self) -> None:
        if self.hub.wait_synced(None):
            self.grpc.set_serving(True)
            self.log.info("synced", peers=len(self.hub.state()[1]))

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        budget = self.settings.shutdown_timeout
        started = time.monotonic()
        self.log.info("shutting down: deregistering first", budget_seconds=budget)
        confirmed = self.registrar.deregister(timeout=budget * 0.6)
        self.hub.close()
        self.grpc.stop(grace=min(2.0, max(0.1, budget - (time.monotonic() - started))))
        for reflector in self.reflectors:
            reflector.stop(timeout=2)
        if self.http is not None:
            self.http.stop()
        self.api.close()
        self.log.info("stopped", deregistration_confirmed=confirmed, seconds=round(time.monotonic() - started, 2))

    def run_until_signalled(self) -> int:
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.log.info("signal received", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        stop.wait()
        self.shutdown()
        return 0
