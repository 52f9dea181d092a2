"""Prometheus metrics, in a registry per daemon (so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RESTORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Owns one Prometheus registry and every metric in it; the daemon creates it and hands it to each part."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.peers = Gauge("discovery_peers", "Peers currently known, by state", ["state"], registry=r)
        self.watch_restarts = Counter(
            "discovery_watch_restarts_total",
            "Watches re-established, by reason (expired, silent, error)",
            ["source", "reason"],
            registry=r,
        )
        self.relists = Counter("discovery_relists_total", "Full lists of a watched resource", ["source"], registry=r)
        self.events_applied = Counter(
            "discovery_watch_events_total", "Watch events applied, by resource and type", ["source", "type"], registry=r
        )
        self.peer_changes = Counter("discovery_peer_changes_total", "Entries appended to the event log", registry=r)
        self.subscribers = Gauge("discovery_stream_subscribers", "Open WatchPeers streams", registry=r)
        self.messages_sent = Counter(
            "discovery_stream_messages_total", "WatchPeers messages sent, by kind", ["kind"], registry=r
        )
        self.api_errors = Counter(
            "discovery_api_errors_total",
            "Failed API server requests, by operation and status code",
            ["operation", "code"],
            registry=r,
        )
        self.api_requests = Counter(
            "discovery_api_requests_total",
            "Requests sent to the API server, by Kubernetes verb (get, list, watch, create, patch, delete) and "
            "status code (0: no answer)",
            ["verb", "code"],
            registry=r,
        )
        self.api_bytes = Counter(
            "discovery_api_received_bytes_total",
            "Response bytes received from the API server (watches included)",
            registry=r,
        )
        self.propagation_lag = Histogram(
            "discovery_propagation_lag_seconds",
            "Time from receiving an API watch event to sending the resulting WatchPeers message",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.registered = Gauge("discovery_registered", "1 while this pod's CR is applied and owned by it", registry=r)
        self.registration_lost = Counter(
            "discovery_registration_lost_total",
            "Times this pod's registration was found lost or altered, by reason (deleted, terminating, taken_over, "
            "altered, missing, lease_lost, keys_deleted, keys_altered)",
            ["reason"],
            registry=r,
        )
        self.registration_restored = Counter(
            "discovery_registration_restored_total",
            "Times this pod's registration was restored after a loss, by the reason of the loss",
            ["reason"],
            registry=r,
        )
        self.registration_restore_seconds = Histogram(
            "discovery_registration_restore_seconds",
            "Time from finding this pod's registration lost to having it restored",
            buckets=RESTORE_BUCKETS,
            registry=r,
        )
        self.registration_blocked = Gauge(
            "discovery_registration_blocked",
            "1 while the registration waits out an object that is being deleted (a finalizer holds it)",
            registry=r,
        )
        self.api_connected = Gauge("discovery_api_connected", "1 while both watches reach the API server", registry=r)
        self.ready = Gauge(
            "discovery_ready", "1 when /readyz would answer 200 (evaluated at each scrape), else 0", registry=r
        )
        self.slow_client_resets = Counter(
            "discovery_stream_slow_client_resets_total",
            "WatchPeers streams restarted with a fresh snapshot because the client fell behind the history",
            registry=r,
        )
        self.smg_manifest_writes = Counter(
            "discovery_smg_manifest_writes_total",
            "SMG worker manifests written, by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.smg_manifest_workers = Gauge(
            "discovery_smg_manifest_workers", "Workers in the SMG manifest last written", registry=r
        )
