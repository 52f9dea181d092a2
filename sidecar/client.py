"""A Python client of the local API, for the main container.

``DiscoveryClient.watch()`` (and ``watch_async()``) yield a ``PeerSetUpdate`` after every message: what
changed and the whole current peer set. When the stream breaks (the sidecar restarts, a deadline,
a network hiccup on a Unix socket) the client reconnects with backoff and resumes from the last
revision it applied: the sidecar then sends only what was missed, or a fresh snapshot flagged
``reset=True`` when it no longer holds that history. Callers never see the seams.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from sidecar.api.discovery.v1 import discovery_pb2 as pb
from sidecar.api.discovery.v1 import discovery_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
CHANNEL_OPTIONS = [
    # ListPeers answers in one message; 10,000 peers with metadata are well over gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 256 * 2**20),
    # The sidecar is on loopback or a Unix socket and often starts moments before its client: retry the
    # connection quickly instead of gRPC's default 1 s (growing to 120 s) backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
PERMANENT_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
)


@dataclass
class PeerSetUpdate:
    """One applied message: the changes it brought and the resulting peer set."""

    kind: str  # "snapshot", "delta", "resumed" or "status"
    revision: int
    history_id: str
    peers: Mapping[str, pb.Peer]  # by pod UID, after applying
    added: list[pb.Peer] = field(default_factory=list)
    updated: list[pb.Peer] = field(default_factory=list)
    removed: list[pb.Peer] = field(default_factory=list)
    reset: bool = False  # a snapshot replaced the set (first message, or resume was not possible)
    connected: bool = True  # False while the sidecar has lost the API server (data may be stale)
    status_reason: str = ""


class PeerSetView:
    """Applies ``WatchPeersResponse`` messages to a local copy of the peer set.

    Parts of one change (``partial``) are gathered and applied together; ``apply`` returns None for
    all but the last part, and the resume revision only moves once a change is complete.
    """

    def __init__(self) -> None:
        self.peers: dict[str, pb.Peer] = {}
        self.revision = 0
        self.history_id = ""
        self.connected = True
        self._parts: list[pb.WatchPeersResponse] = []

    def apply(self, message: pb.WatchPeersResponse) -> PeerSetUpdate | None:
        if message.partial:
            self._parts.append(message)
            return None
        parts, self._parts = [*self._parts, message], []
        kind = message.WhichOneof("kind") or ""
        update = PeerSetUpdate(kind=kind, revision=message.revision, history_id=message.history_id, peers=self.peers)
        if kind == "snapshot":
            previous = self.peers
            self.peers = {p.uid: p for part in parts for p in part.snapshot.peers}
            update.peers = self.peers
            update.reset = True
            update.added = [p for uid, p in self.peers.items() if uid not in previous]
            update.updated = [p for uid, p in self.peers.items() if uid in previous and previous[uid] != p]
            update.removed = [p for uid, p in previous.items() if uid not in self.peers]
            self.connected = message.snapshot.status != pb.API_STATUS_DEGRADED
        elif kind == "delta":
            for event in (e for part in parts for e in part.delta.events):
                if event.type == pb.EVENT_TYPE_REMOVED:
                    self.peers.pop(event.peer.uid, None)
                    update.removed.append(event.peer)
                else:
                    (update.added if event.type == pb.EVENT_TYPE_ADDED else update.updated).append(event.peer)
                    self.peers[event.peer.uid] = event.peer
        elif kind == "resumed":
            self.connected = message.resumed.status != pb.API_STATUS_DEGRADED
        elif kind == "status":
            self.connected = message.status.status != pb.API_STATUS_DEGRADED
            update.status_reason = message.status.reason
        self.revision = message.revision
        self.history_id = message.history_id
        update.connected = self.connected
        return update

    def resume_request(self, peer_filter: pb.PeerFilter) -> pb.WatchPeersRequest:
        self._parts = []  # an incomplete change is resent from the last complete revision
        return pb.WatchPeersRequest(
            filter=peer_filter, resume_history_id=self.history_id, resume_revision=self.revision
        )


def make_filter(
    selector: str = "",
    groups: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    include_self: bool = False,
    ready_only: bool = False,
) -> pb.PeerFilter:
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups or [])
    return pb.PeerFilter(
        selector=selector,
        groups=[pb.PeerGroup(name=n, selector=s) for n, s in items],
        include_self=include_self,
        ready_only=ready_only,
    )


def _next_delay(attempt: int, maximum: float) -> float:
    bound = min(maximum, 0.1 * 2**attempt)
    return random.uniform(bound / 2, bound)


class DiscoveryClient:
    def __init__(self, target: str = DEFAULT_TARGET) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.DiscoveryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_peers(self, peer_filter: pb.PeerFilter | None = None, timeout: float = 30.0) -> pb.ListPeersResponse:
        return self.stub.ListPeers(
            pb.ListPeersRequest(filter=peer_filter or pb.PeerFilter()), timeout=timeout, wait_for_ready=True
        )

    def get_self(self, timeout: float = 10.0) -> pb.GetSelfResponse:
        return self.stub.GetSelf(pb.GetSelfRequest(), timeout=timeout, wait_for_ready=True)

    def publish_metadata(
        self, data: Mapping[str, Any], merge: bool = False, timeout: float = 30.0
    ) -> pb.PublishMetadataResponse:
        mode = pb.PUBLISH_MODE_MERGE_PATCH if merge else pb.PUBLISH_MODE_REPLACE
        request = pb.PublishMetadataRequest(data_json=json.dumps(dict(data)), mode=mode)
        return self.stub.PublishMetadata(request, timeout=timeout, wait_for_ready=True)

    def watch(
        self,
        peer_filter: pb.PeerFilter | None = None,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        view: PeerSetView | None = None,
    ) -> Iterator[PeerSetUpdate]:
        """Yield an update per message, reconnecting and resuming by revision until closed."""
        peer_filter = peer_filter or pb.PeerFilter()
        view = view or PeerSetView()
        attempt = 0
        while True:
            call = self.stub.WatchPeers(view.resume_request(peer_filter), wait_for_ready=True)
            try:
                for message in call:
                    attempt = 0
                    update = view.apply(message)
                    if update is not None:
                        yield update
                return  # the server ended the stream cleanly
            except grpc.RpcError as exc:
                if not reconnect or exc.code() in PERMANENT_CODES or exc.code() == grpc.StatusCode.CANCELLED:
                    raise
            finally:
                call.cancel()
            time.sleep(_next_delay(attempt, max_backoff))  # backoff between reconnects
            attempt += 1


class AsyncDiscoveryClient:
    """The same for asyncio programs (``grpc.aio``)."""

    def __init__(self, target: str = DEFAULT_TARGET) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.DiscoveryStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def list_peers(self, peer_filter: pb.PeerFilter | None = None, timeout: float = 30.0) -> pb.ListPeersResponse:
        return await self.stub.ListPeers(
            pb.ListPeersRequest(filter=peer_filter or pb.PeerFilter()), timeout=timeout, wait_for_ready=True
        )

    async def watch(
        self, peer_filter: pb.PeerFilter | None = None, reconnect: bool = True, max_backoff: float = 5.0
    ) -> AsyncIterator[PeerSetUpdate]:
        peer_filter = peer_filter or pb.PeerFilter()
        view = PeerSetView()
        attempt = 0
        while True:
            call = self.stub.WatchPeers(view.resume_request(peer_filter), wait_for_ready=True)
            try:
                async for message in call:
                    attempt = 0
                    update = view.apply(message)
                    if update is not None:
                        yield update
                return
            except grpc.aio.AioRpcError as exc:
                if not reconnect or exc.code() in PERMANENT_CODES or exc.code() == grpc.StatusCode.CANCELLED:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(_next_delay(attempt, max_backoff))  # backoff between reconnects
            attempt += 1
