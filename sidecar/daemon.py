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
from sidecar.core.containers import peer_key
from sidecar.core.directory import PeerDirectory
from sidecar.core.join import PeerJoin
from sidecar.grpc_service import DiscoveryService, GrpcServer
from sidecar.http_server import HttpServer
from sidecar.hub import PeerHub
from sidecar.kube.api import KubeApi
from sidecar.kube.reflector import Reflector
from sidecar.kube.registration import Registrar
from sidecar.kube.sources import WORKER_METADATA, watch_targets
from sidecar.metrics import Metrics
from sidecar.reporting import PeerChangeReporter
from sidecar.smg_writer import SmgManifestWriter


class Sidecar:
    """Owns every part of one running sidecar and their order of start and stop; the CLI's ``run``
    (and in-process tests) construct it."""

    def __init__(self, settings: Settings, api: KubeApi | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)
        self.api = api or KubeApi.from_kubeconfig(settings.kubeconfig, settings.request_timeout)
        self.metrics = Metrics()
        self.api.on_request = lambda method, code: self.metrics.api_requests.labels(method, str(code)).inc()
        self.api.on_bytes = self.metrics.api_bytes.inc
        targets = watch_targets(settings)
        directory = PeerDirectory(
            history_id=uuid.uuid4().hex,
            history_capacity=settings.history_size,
            history_bytes=settings.history_bytes,
            sources=[target.name for target in targets],
            join=PeerJoin(require_metadata=settings.require_metadata, workers=settings.workers),
        )
        identity = settings.identity
        self.hub = PeerHub(directory, self_uid=peer_key(identity.uid, identity.name, settings.metadata_name))
        self.hub.add_listener(PeerChangeReporter(self.log, self.metrics))
        self.registrar = Registrar(
            self.api,
            settings.identity,
            settings.pod_labels,
            settings.initial_metadata,
            settings.field_manager,
            self.metrics,
            settings.backoff_max,
            register=settings.register,
            metadata_name=settings.metadata_name,
        )
        self.reflectors = [
            Reflector(
                self.api,
                target,
                self.hub.store(target.name),
                self.metrics,
                silence_timeout=settings.watch_silence_timeout,
                backoff_max=settings.backoff_max,
                observers=[self.registrar.observe] if target.source is WORKER_METADATA else [],
            )
            for target in targets
        ]
        self.smg_writer = (
            SmgManifestWriter(self.hub, settings.smg_manifest, self.log, self.metrics)
            if settings.smg_manifest is not None
            else None
        )
        self.grpc = GrpcServer(
            DiscoveryService(
                self.hub, self.registrar, settings.identity, self.metrics, metadata_name=settings.metadata_name
            ),
            settings.grpc_listen,
        )
        self.http = (
            HttpServer(
                settings.http_listen,
                self.hub,
                self.metrics,
                self.liveness_problems,
                self.readiness_problems,
                settings.debug_peers,
                readiness_notes=self.registrar.notes,
            )
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
        problems.extend(self.registrar.problems())
        if self.smg_writer is not None:
            problems.extend(self.smg_writer.problems())
        if not self.hub.synced:
            problems.append("watches not synced yet")
        problems.extend(f"{source}: {reason}" for source, reason in self.hub.source_health().items())
        # A dead thread is a readiness failure too: peers it fed would silently go stale while the pod
        # stays in its Service (liveness may be off, or slow to restart the container).
        problems.extend(self.liveness_problems())
        return problems

    def liveness_problems(self) -> list[str]:
        if self._stopping.is_set():
            return []
        return [f"thread {t.name} has died" for t in self._threads if not t.is_alive()]

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        self._threads = [reflector.start() for reflector in self.reflectors]
        self._threads.append(self.registrar.start())
        if self.smg_writer is not None:
            self._threads.append(self.smg_writer.start())
        threading.Thread(target=self._mark_serving_when_synced, name="health", daemon=True).start()
        self.log.info(
            "started",
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            watches=[
                f"{r.target.name} in {r.target.namespace or 'all namespaces'} ({r.target.label_selector or 'all'})"
                for r in self.reflectors
            ],
            history_id=self.hub.history_id,
        )

    def _mark_serving_when_synced(self) -> None:
        if self.hub.wait_synced(None):
            self.grpc.set_serving(True)
            self.log.info("synced", peers=len(self.hub.state().peers))

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        budget = self.settings.shutdown_timeout
        started = time.monotonic()
        self.log.info("shutting down: deregistering first", budget_seconds=budget)
        confirmed = self.registrar.deregister(timeout=budget * 0.6)
        if self.smg_writer is not None:
            self.smg_writer.stop()  # the file stays: SMG keeps its workers while this pod shuts down
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
