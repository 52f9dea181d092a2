"""Test helper: consume a WatchPeers stream in the background and wait on what it shows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, PeerSetUpdate, PeerSetView


class StreamRecorder:
    """Follows one sidecar's WatchPeers stream (reconnecting and resuming like a real client)."""

    def __init__(self, target: str, peer_filter: pb.PeerFilter | None = None, reconnect: bool = True) -> None:
        self.client = DiscoveryClient(target)
        self.view = PeerSetView()
        self.updates: list[PeerSetUpdate] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._filter = peer_filter
        self._reconnect = reconnect
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for update in self.client.watch(self._filter, reconnect=self._reconnect, max_backoff=0.5, view=self.view):
                with self._lock:
                    self.updates.append(update)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test through .error
            self.error = exc

    def names(self) -> dict[str, str]:
        """pod name -> state name, as the client currently sees it."""
        with self._lock:
            return {p.name: pb.PeerState.Name(p.state) for p in self.view.peers.values()}

    def peers(self) -> dict[str, pb.Peer]:
        with self._lock:
            return {p.name: p for p in self.view.peers.values()}

    def kinds(self) -> list[str]:
        with self._lock:
            return [u.kind for u in self.updates]

    def wait_until(self, condition: Callable[[StreamRecorder], object], timeout: float = 30.0, what: str = "") -> None:
        def check() -> object:
            if self.error is not None and not self._reconnect:
                raise AssertionError(f"stream failed: {self.error}")
            with self._lock:
                started = bool(self.updates)
            return started and condition(self)  # nothing is known before the first snapshot

        try:
            wait_for(check, timeout, what=what or "the stream to reach the expected state")
        except TimeoutError as exc:
            shown = f"{self.names()} after {len(self.kinds())} messages {self.kinds()[-5:]}"
            raise AssertionError(f"{exc}; stream shows {shown} (error: {self.error})") from None

    def wait_names(self, expected: set[str], timeout: float = 30.0) -> None:
        self.wait_until(lambda r: set(r.names()) == expected, timeout, f"peers == {sorted(expected)}")

    def close(self) -> None:
        self.client.close()
        self._thread.join(5)
