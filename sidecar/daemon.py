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
from sidecar.grpc_service import DiscoveryService, GrpcServer
from sidecar.http_server import HttpServer
from sidecar.hub import PeerHub
from sidecar.kube.api import KubeApi
from sidecar.kube.reflector import Reflector
from sidecar.kube.registration import Registrar
from sidecar.kube.sources import WORKER_METADATA, watch_targets
from sidecar.metrics import Metrics
from sidecar.reporting import PeerChangeReporter


class Sidecar:
    """Owns every part of one running sidecar and their order of start and stop; the CLI's ``run``
    (and in-process tests) construct it."""

    def __init__(self, settings: Settings, api: KubeApi | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)
        self.api = api or KubeApi.from_kubeconfig(settings.kubeconfig, settings.request_timeout)
        self.metrics = Metrics()
        self.api.on_request = lambda verb, code: self.metrics.api_requests.labels(verb, str(code)).inc()
        self.api.on_bytes = self.metrics.api_bytes.inc
        targets = watch_targets(settings)
        directory = PeerDirectory(
            history_id=uuid.uuid4().hex,
            history_capacity=settings.history_size,
            history_bytes=settings.history_bytes,
            sources=[target.name for target in targets],
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
                streaming_list=settings.streaming_list,
                observers=[self.registrar.observe] if target.source is WORKER_METADATA else [],
            )
            for target in targets
        ]
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
        self._watch_lock = threading.Lock()  # guards _watching and the reflector threads' start
        self._watching = False

    # -- probes -----------------------------------------------------------------------------------------
    def readiness_problems(self) -> list[str]:
        problems = []
        if self._stopping.is_set():
            problems.append("shutting down")
        problems.extend(self.registrar.problems())
        if self.watching and not self.hub.synced:  # not watching (yet): readiness is the registration alone
            problems.append("watches not synced yet")
        problems.extend(f"{source}: {reason}" for source, reason in self.hub.source_health().items())
        # A dead thread is a readiness failure too: peers it fed would silently go stale while the pod
        # stays in its Service (liveness may be off, or slow to restart the container).
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

    def _covers_own_cr(self) -> bool:
        """Whether this sidecar's CR watch shows its own CR (so the watch can confirm its deregistration)."""
        peers = self.settings.peer_selector
        return peers is None or peers.matches(self.settings.pod_labels)

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        self.registrar.confirm_by_watch = False  # until a watch that shows its own CR runs
        with self._watch_lock:
            self._threads = [self.registrar.start()]
        mode = self.settings.watch
        if mode == "always":
            self._start_watches("DISCOVERY_WATCH=always")
            threading.Thread(target=self._mark_serving_when_synced, name="health", daemon=True).start()
        else:
            # Nothing is watched until asked (auto) or ever (never): the API answers at once, peer requests
            # start the watches and wait for the sync within their deadline, or are refused.
            if mode == "auto":
                self.hub.watch_on_demand(lambda: self._start_watches("the first request for peers"))
            else:
                self.hub.refuse_peers(
                    "this sidecar does not watch peers (DISCOVERY_WATCH=never): it only registers this pod; "
                    "set DISCOVERY_WATCH=auto or always on pods that read peers"
                )
            self.grpc.set_serving(True)
        self.log.info(
            "started",
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            watch_mode=mode,
            watches=[
                f"{r.target.name} in {r.target.namespace or 'all namespaces'} ({r.target.label_selector or 'all'})"
                for r in self.reflectors
            ],
            history_id=self.hub.history_id,
        )

    def _start_watches(self, why: str) -> None:
        """Start every reflector, once; called at start-up (always) or by the first peer request (auto)."""
        with self._watch_lock:
            if self._watching or self._stopping.is_set():
                return
            self._watching = True
            self.registrar.confirm_by_watch = self._covers_own_cr()
            self._threads.extend(reflector.start() for reflector in self.reflectors)
        self.log.info("watching peers", reason=why, watches=len(self.reflectors))

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
