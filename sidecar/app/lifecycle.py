"""What the sidecar and the relay do alike around their work: stop on a signal, serve once synced.

Both are long-running processes a kubelet stops with SIGTERM (and a terminal with SIGINT), and both must not
answer gRPC health as serving before their watches have synced, or a client would read an empty peer set as
the truth.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from sidecar.app import collector
from sidecar.peers.hub import PeerHub
from sidecar.serve.grpc_server import GrpcServer


def stop_on_signals(log: Any) -> threading.Event:
    """An event set (and logged) on SIGTERM or SIGINT; the caller waits on it, then shuts down in order.

    Handlers only set the event: shutting down inside a signal handler would run it on whatever frame the
    main thread was in."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def serve_once_synced(hub: PeerHub, grpc: GrpcServer, log: Any) -> threading.Thread:
    """Mark the gRPC health service serving when the hub first syncs, and settle the collector (a thread;
    returns it started)."""

    def wait() -> None:
        if hub.wait_synced(None):
            grpc.set_serving(True)
            log.info("synced", peers=len(hub.state().peers))
            collector.settle()  # the synced peer set lives on: out of the collector's way

    thread = threading.Thread(target=wait, name="health", daemon=True)
    thread.start()
    return thread
