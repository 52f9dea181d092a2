"""``discovery-sidecar run``: wire the pieces together and run them until SIGTERM.

Two backends, one serving layer. On Kubernetes the sources are reflectors (EndpointSlices or Pods,
and the DynamoWorkerMetadata CRs) and the publisher is this pod's CR; on etcd the source is the watch
of Dynamo's ``v1/`` prefixes and the publisher is this instance's lease. Both meet the hub, the gRPC
service and the HTTP server through ``sidecar.ports`` only, so the main container is served the same
way whichever backend is configured.

Start-up never crashes on an unreachable API server: the watches and the registrar retry with
backoff while ``/readyz`` says what is missing. (On etcd, as in Dynamo's runtime, the first
connection must succeed within ``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS``, else the process exits 1.)
Shutdown runs in the order peers and the main container need: deregister first (peers see this pod
leave: the CR deleted, or the lease revoked), then end the streams (clients are told UNAVAILABLE and
can resume against the next sidecar), then stop the watches.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import structlog

from sidecar import __version__
from sidecar.config import Settings
from sidecar.core.backoff import Backoff
from sidecar.core.containers import peer_key as pod_peer_key
from sidecar.core.directory import PeerDirectory
from sidecar.core.instance_join import InstanceJoin, peer_key
from sidecar.core.join import PeerJoin
from sidecar.etcd.client import EtcdClient, EtcdError, EtcdUnavailable
from sidecar.etcd.own_keys import OwnKeysWatch
from sidecar.etcd.publisher import EtcdPublisher
from sidecar.etcd.source import SOURCE_NAME as ETCD_SOURCE
from sidecar.etcd.source import EtcdSource
from sidecar.grpc_service import DiscoveryService, GrpcServer
from sidecar.http_server import HttpServer
from sidecar.hub import PeerHub
from sidecar.metrics import Metrics
from sidecar.ports import MetadataPublisher
from sidecar.registration_health import RegistrationHealth
from sidecar.reporting import PeerChangeReporter
from sidecar.smg_writer import SmgManifestWriter

if TYPE_CHECKING:
    from sidecar.kube.api import KubeApi


class StartupError(Exception):
    """The sidecar cannot start (e.g. etcd unreachable for the whole start-up timeout); ``str()`` says why."""


class Watcher(Protocol):
    """A source's shell: a Kubernetes reflector or the etcd watch."""

    def start(self) -> threading.Thread: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class Registering(MetadataPublisher, Protocol):
    """This pod's registration as the daemon drives it: the CR registrar or the etcd lease."""

    def start(self) -> threading.Thread: ...

    def deregister(self, timeout: float) -> bool: ...

    def notes(self) -> list[str]:
        """A healthy but unusual state for ``/readyz``'s body (watch-only, and why)."""
        ...

    @property
    def health(self) -> RegistrationHealth:
        """What happens to the registration (lost, restored, blocked, failing), for logs, metrics, streams."""
        ...


class Sidecar:
    """Owns every part of one running sidecar and their order of start and stop; the CLI's ``run``
    (and in-process tests) construct it. Which parts depends on ``settings.backend``."""

    def __init__(self, settings: Settings, api: KubeApi | None = None, etcd: EtcdClient | None = None) -> None:
        self.settings = settings
        self.log = structlog.get_logger("sidecar").bind(pod=settings.identity.name)
        self.metrics = Metrics()
        self.api: KubeApi | None = None
        self.etcd: EtcdClient | None = None
        self.watchers: list[Watcher] = []
        self.watch_descriptions: list[str] = []
        self.close_transport: Callable[[], None] = lambda: None
        # The watch of this pod's own registration (Kubernetes: its CR alone), whatever DISCOVERY_WATCH says;
        # on etcd the publisher follows its keys itself.
        self.own_watch: Watcher | None = None
        if settings.uses_etcd:
            self.hub, self.registrar = self._wire_etcd(etcd)
        else:
            self.hub, self.registrar = self._wire_kubernetes(api)
        # Registration that cannot be written (a terminating CR waited out, failing writes): DEGRADED on streams.
        self.registrar.health.listener = self.hub.set_registration_health
        self.hub.add_listener(PeerChangeReporter(self.log, self.metrics))
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
        self._watch_lock = threading.Lock()  # guards _watching and _threads
        self._watching = False

    def _directory(self, sources: list[str], join: InstanceJoin | PeerJoin | None = None) -> PeerDirectory:
        return PeerDirectory(
            history_id=uuid.uuid4().hex,
            history_capacity=self.settings.history_size,
            history_bytes=self.settings.history_bytes,
            sources=sources,
            join=join,
        )

    def _wire_kubernetes(self, api: KubeApi | None) -> tuple[PeerHub, Registering]:
        # Imported here: the official Kubernetes client costs ~33 MiB and ~0.5 s of start-up, which a
        # sidecar on the etcd backend never needs (bench/RESULTS.md, etcd section).
        from sidecar.kube.api import KubeApi
        from sidecar.kube.own_registration import own_registration_watch
        from sidecar.kube.reflector import Reflector
        from sidecar.kube.registration import Registrar
        from sidecar.kube.sources import watch_targets

        settings = self.settings
        self.api = api = api or KubeApi.from_kubeconfig(settings.kubeconfig, settings.request_timeout)
        api.on_request = lambda verb, code: self.metrics.api_requests.labels(verb, str(code)).inc()
        api.on_bytes = self.metrics.api_bytes.inc
        self.close_transport = api.close
        targets = watch_targets(settings)
        identity = settings.identity
        hub = PeerHub(
            self._directory(
                [target.name for target in targets],
                join=PeerJoin(require_metadata=settings.require_metadata, workers=settings.workers),
            ),
            self_uid=pod_peer_key(identity.uid, identity.name, settings.metadata_name),
        )
        registrar = Registrar(
            api,
            settings.identity,
            settings.pod_labels,
            settings.initial_metadata,
            settings.field_manager,
            self.metrics,
            settings.backoff_max,
            register=settings.register,
            metadata_name=settings.metadata_name,
            resync=settings.registration_resync,
        )
        reflectors = [
            Reflector(
                api,
                target,
                hub.store(target.name),
                self.metrics,
                silence_timeout=settings.watch_silence_timeout,
                backoff_max=settings.backoff_max,
                streaming_list=settings.streaming_list,
            )
            for target in targets
        ]
        own, own_store = own_registration_watch(
            api,
            identity.namespace,
            settings.metadata_name,
            registrar.observe,
            registrar.relisted,
            self.metrics,
            silence_timeout=settings.watch_silence_timeout,
            backoff_max=settings.backoff_max,
            streaming_list=settings.streaming_list,
        )
        registrar.watch_healthy = lambda: own_store.healthy
        self.own_watch = own
        self.watchers = list(reflectors)
        self.watch_descriptions = [
            f"{r.target.name} in {r.target.namespace or 'all namespaces'} ({r.target.selectors})"
            for r in [*reflectors, own]
        ]
        return hub, registrar

    def _wire_etcd(self, client: EtcdClient | None) -> tuple[PeerHub, Registering]:
        """etcd: one source (the ``v1/`` prefixes, joined by lease) and the lease as the publisher.

        This instance is the peer ``etcd/{lease:x}``; a lost lease is replaced by a new one (a new
        instance ID), so the hub's notion of "self" follows the publisher.
        """
        settings = self.settings
        etcd_settings = settings.etcd
        if etcd_settings is None:
            raise ValueError("the etcd backend needs etcd settings (load_settings makes them)")
        self.etcd = client = client or EtcdClient(etcd_settings, settings.request_timeout)
        self.close_transport = client.close
        hub = PeerHub(self._directory([ETCD_SOURCE], join=InstanceJoin()), self_uid="")
        publisher = EtcdPublisher(
            client,
            settings.initial_metadata,
            lease_ttl=etcd_settings.lease_ttl,
            metrics=self.metrics,
            backoff_max=settings.backoff_max,
            labels=settings.pod_labels,
            on_registered=lambda lease: hub.set_self_uid(peer_key(lease)),
            register=settings.register,
        )
        source = EtcdSource(
            client,
            hub.store(ETCD_SOURCE),
            self.metrics,
            backoff_max=settings.backoff_max,
            silence_timeout=settings.watch_silence_timeout,
        )
        if not publisher.watch_only:
            own = OwnKeysWatch(
                client,
                publisher,
                backoff_max=settings.backoff_max,
                silence_timeout=settings.watch_silence_timeout,
                resync=settings.registration_resync,
            )
            publisher.on_keys_changed = own.refresh
            self.own_watch = own
        self.watchers = [source]
        self.watch_descriptions = [
            f"etcd {etcd_settings.endpoints_text} (v1/instances, v1/mdc, v1/event_channels, v1/event_sources)"
        ]
        return hub, publisher

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
        problems.extend(self.registrar.problems())
        if self.smg_writer is not None:
            problems.extend(self.smg_writer.problems())
        if self.settings.watch == "always" and not self.hub.synced:
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
    def wait_for_etcd(self, stop: threading.Event | None = None) -> bool:
        """Dynamo's start-up rule on etcd: reach it within ``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS`` or exit.

        True once reached (or not on etcd), False when ``stop`` was set while waiting. Only
        unavailability is retried; a refusal (credentials, permissions) raises ``StartupError`` at once.
        """
        if self.etcd is None or self.settings.etcd is None:
            return True
        stop = stop or threading.Event()
        timeout = self.settings.etcd.startup_connect_timeout
        deadline = time.monotonic() + timeout
        backoff = Backoff(maximum=min(2.0, self.settings.backoff_max))
        while not stop.is_set():
            try:
                self.etcd.range(b"v1/instances/", limit=1)
                return True
            except EtcdUnavailable as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise StartupError(
                        f"cannot reach etcd at {self.settings.etcd.endpoints_text} within {timeout:g}s "
                        f"(ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS): {exc}"
                    ) from exc
                self.log.warning("etcd not reachable yet", error=str(exc), retry_in=round(delay, 2))
                stop.wait(delay)
            except EtcdError as exc:
                raise StartupError(f"etcd at {self.settings.etcd.endpoints_text} refused the sidecar: {exc}") from exc
        return False

    def start(self) -> None:
        self.metrics.api_connected.set(1)
        self.grpc.start()
        if self.http is not None:
            self.http.start()
        with self._watch_lock:
            self._threads = [self.registrar.start()]
            if self.own_watch is not None:
                self._threads.append(self.own_watch.start())
        mode = self.settings.watch
        if self.smg_writer is not None:
            # The manifest is a standing request for peers: it starts the watches at once (never is refused
            # with a manifest at start-up).
            with self._watch_lock:
                self._threads.append(self.smg_writer.start())
            self._start_watches("the SMG manifest writer")
        if mode == "always":
            self._start_watches("DISCOVERY_WATCH=always")
            threading.Thread(target=self._mark_serving_when_synced, name="health", daemon=True).start()
        else:
            # Nothing is watched until asked (auto) or ever (never): the API answers at once; peer requests
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
            version=__version__,  # which build runs: an upgrade (a restart with a new build) shows here
            backend=self.settings.backend,
            grpc=self.grpc.target,
            http=f":{self.http.port}" if self.http else "off",
            watch_mode=mode,
            watches=self.watch_descriptions,
            history_id=self.hub.history_id,
        )

    def _start_watches(self, why: str) -> None:
        """Start every watch, once: at start-up (always) or on the first peer request (auto)."""
        with self._watch_lock:
            if self._watching or self._stopping.is_set():
                return
            self._watching = True
            self._threads.extend(watcher.start() for watcher in self.watchers)
        self.log.info("watching peers", reason=why, watches=len(self.watchers))

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
        for watcher in [*self.watchers, *([self.own_watch] if self.own_watch is not None else [])]:
            watcher.stop(timeout=2)
        if self.http is not None:
            self.http.stop()
        self.close_transport()
        self.log.info("stopped", deregistration_confirmed=confirmed, seconds=round(time.monotonic() - started, 2))

    def run_until_signalled(self) -> int:
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.log.info("signal received", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            reached = self.wait_for_etcd(stop)
        except StartupError as exc:
            self.log.error("cannot start", reason=str(exc))
            self.close_transport()
            return 1
        if not reached:
            self.close_transport()
            return 0
        self.start()
        stop.wait()
        self.shutdown()
        return 0
