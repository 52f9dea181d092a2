"""HTTP endpoints for the kubelet and for people: probes, Prometheus metrics, the peer list.

``/healthz``  the process is alive and its threads are running (liveness).
``/readyz``   registered (or watch-only, which the body notes) and every watch synced; the body says what is missing.
``/metrics``  Prometheus text format.
``/debug/peers`` the current peer set as JSON (including this pod), like SGLang's ``/workers``.

The listener faces the cluster network (the kubelet probes it), but the peer list is every peer's
addresses and metadata: by default only this pod (a loopback client) may read it (``debug_peers``).
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import ListenAddress, NotWatching, PeerReader

Check = Callable[[], list[str]]
"""Returns the reasons something is not OK (empty: OK)."""


class DebugPeers(StrEnum):
    """Who may read ``/debug/peers`` (``DISCOVERY_DEBUG_PEERS``)."""

    LOOPBACK = "loopback"  # this pod only
    ALL = "all"
    OFF = "off"


DEBUG_PEERS_ACCESS = tuple(access.value for access in DebugPeers)
DEBUG_SYNC_WAIT = 10.0
"""Seconds the ``/debug/peers`` request that started the watches waits for their first sync."""


def may_read_peers(access: str, client_host: str) -> bool:
    """Whether a client at ``client_host`` may read the peer list under ``access``."""
    if access == "all":
        return True
    if access == "off":
        return False
    try:
        return ipaddress.ip_address(client_host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class HttpServer:
    """Owns the HTTP listener and its thread; the daemon gives it the peer reader and the two checks."""

    def __init__(
        self,
        listen: ListenAddress,
        peers: PeerReader,
        metrics: Metrics,
        liveness: Check,
        readiness: Check,
        debug_peers: str = "loopback",
        readiness_notes: Check | None = None,
    ) -> None:
        if debug_peers not in DEBUG_PEERS_ACCESS:
            raise ValueError(f"debug_peers must be one of {', '.join(DEBUG_PEERS_ACCESS)}, got {debug_peers!r}")
        handler = self._handler_class(peers, metrics, liveness, readiness, debug_peers, readiness_notes or list)
        self.server = ThreadingHTTPServer((listen.host, listen.port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @staticmethod
    def _handler_class(
        peers: PeerReader, metrics: Metrics, liveness: Check, readiness: Check, debug_peers: str, notes: Check
    ) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            """One request; the closure gives it the reader, the metrics and the checks (no shared state)."""

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes would flood the log
                return

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _check(self, check: Check, notes: Check = list) -> None:
                problems = check()
                text = "".join(f"{p}\n" for p in problems or ["ok", *notes()])
                self._send(200 if not problems else 503, text.encode(), "text/plain; charset=utf-8")

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._check(liveness)
                elif path == "/readyz":
                    self._check(readiness, notes)
                elif path == "/metrics":
                    metrics.ready.set(0 if readiness() else 1)  # what /readyz would say now, for alerts
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/debug/peers" and not may_read_peers(debug_peers, self.client_address[0]):
                    self._send(
                        403,
                        b"/debug/peers is served to this pod only (DISCOVERY_DEBUG_PEERS=loopback); "
                        b"use kubectl port-forward, or set DISCOVERY_DEBUG_PEERS=all\n",
                        "text/plain",
                    )
                elif path == "/debug/peers":
                    try:
                        started = peers.demand()
                    except NotWatching as exc:
                        self._send(412, f"{exc}\n".encode(), "text/plain")
                        return
                    if started:
                        # This request started the watches (DISCOVERY_WATCH=auto): give them a moment to sync, as
                        # a gRPC caller's deadline would; "synced" in the body says if they did.
                        peers.wait_synced(DEBUG_SYNC_WAIT)
                    revision, current, status = peers.state()
                    body = {
                        "history_id": peers.history_id,
                        "revision": revision,
                        "synced": peers.synced,
                        "api_status": status.status.value,
                        "api_status_reason": status.reason,
                        "peers": [
                            p.to_json_dict() | {"self": p.uid == peers.self_uid}
                            for p in sorted(current, key=lambda p: (p.namespace, p.name))
                        ],
                    }
                    self._send(200, json.dumps(body, indent=2).encode() + b"\n", "application/json")
                else:
                    self._send(404, b"not found: try /healthz, /readyz, /metrics or /debug/peers\n", "text/plain")

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
