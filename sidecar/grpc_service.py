"""The local gRPC API: ``discovery.v1.Discovery`` plus standard health checking and reflection.

Each ``WatchPeers`` stream is one thread that holds nothing but a cursor (a revision) into the hub's
shared event log. It waits for new entries, projects them through its filter (coalesced per peer)
and sends them. gRPC's flow control blocks a send to a client that does not read; meanwhile the log
moves on without it, and if the client's position falls out of the bounded history it is sent a
fresh snapshot (``SNAPSHOT_REASON_CLIENT_TOO_SLOW``) instead of a backlog. Memory per stream is thus
bounded by one batch, whatever the client does.

The service reads the peer set through ``PeerReader`` and publishes through ``MetadataPublisher``
(``sidecar.ports``); it imports no Kubernetes code, and maps the publisher's errors, which carry a
meaning, to status codes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.api.discovery.v1 import discovery_pb2 as pb
from sidecar.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from sidecar.config import ListenAddress, PodIdentity
from sidecar.core.eventlog import ApiStatus
from sidecar.core.instance_id import instance_id
from sidecar.core.peer import canonical_json
from sidecar.core.projection import DeltaMessage, PeerFilter, StatusMessage, project, snapshot_peers
from sidecar.metrics import Metrics
from sidecar.ports import (
    Forbidden,
    Invalid,
    MetadataPublisher,
    NotFound,
    PeerReader,
    RegistrationError,
    TooLarge,
    Unavailable,
)
from sidecar.wire import API_STATUS, EVENT_TYPE, PeerEncoder, document_from_publish, filter_from_pb, to_struct

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Discovery"].full_name
WAKE_INTERVAL = 0.5
"""How often an idle stream checks that its client is still there (seconds)."""
BATCH_LIMIT = 2000
"""Most log entries folded into one read; bounds the work and memory of one iteration."""
MAX_STREAMS = 64
PART_BYTES = 1 << 20
"""Largest payload of one stream message: gRPC clients refuse messages over 4 MiB by default, so bigger
snapshots and deltas go out in parts (``partial``) that clients apply together."""


def split_by_size(items: list[T], size_of: Callable[[T], int], limit: int = PART_BYTES) -> list[list[T]]:
    """Consecutive groups of ``items`` whose sizes add up to at most ``limit`` (one item may exceed it)."""
    parts: list[list[T]] = [[]]
    size = 0
    for item in items:
        item_size = size_of(item)
        if parts[-1] and size + item_size > limit:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += item_size
    return parts


PUBLISH_ERROR_CODES: dict[type[RegistrationError], grpc.StatusCode] = {
    Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    # The target may appear (the CRD gets installed) and the store come back: worth retrying.
    NotFound: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def publish_error_code(exc: RegistrationError) -> grpc.StatusCode:
    for meaning, code in PUBLISH_ERROR_CODES.items():
        if isinstance(exc, meaning):
            return code
    return grpc.StatusCode.UNAVAILABLE


class DiscoveryService(pb_grpc.DiscoveryServicer):
    """The ``discovery.v1.Discovery`` servicer. Owns nothing shared but the encoder cache (``PeerEncoder``,
    which has its own lock); each RPC runs in a gRPC worker thread and reads ``peers`` without holding a
    lock across IO. Constructed by the daemon (or a test) with the hub and the publisher."""

    def __init__(
        self,
        peers: PeerReader,
        publisher: MetadataPublisher | None,
        identity: PodIdentity,
        metrics: Metrics,
        encoder: PeerEncoder | None = None,
    ) -> None:
        self.peers = peers
        self.publisher = publisher
        self.identity = identity
        self.metrics = metrics
        self.encoder = encoder or PeerEncoder()
        # Label children resolved once: .labels() is a dict lookup under a lock, on every message sent.
        self._sent = {kind: metrics.messages_sent.labels(kind) for kind in ("snapshot", "resumed", "delta", "status")}
        self.log = structlog.get_logger("sidecar.grpc")

    # -- WatchPeers -------------------------------------------------------------------------------------
    def WatchPeers(
        self, request: pb.WatchPeersRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPeersResponse]:
        try:
            peer_filter = filter_from_pb(request.filter)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.metrics.subscribers.inc()
        try:
            yield from self._stream(request, peer_filter, context)
        finally:
            self.metrics.subscribers.dec()
        if self.peers.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the discovery sidecar is shutting down; reconnect to resume")

    def _wait_synced(self, context: grpc.ServicerContext) -> bool:
        while not self.peers.wait_synced(WAKE_INTERVAL):
            if self.peers.closed or not context.is_active():
                return False
        return True

    def _snapshot(self, peer_filter: PeerFilter, reason: pb.SnapshotReason) -> tuple[int, list[pb.WatchPeersResponse]]:
        """The filtered peer set at one revision, in as many parts as its size needs."""
        revision, peers, status = self._filtered_peers(peer_filter)
        parts = split_by_size(peers, lambda m: m.ByteSize())
        messages = [
            pb.WatchPeersResponse(
                revision=revision,
                history_id=self.peers.history_id,
                snapshot=pb.Snapshot(peers=part, reason=reason, status=API_STATUS[status]),
                partial=index < len(parts) - 1,
            )
            for index, part in enumerate(parts)
        ]
        return revision, messages

    def _filtered_peers(self, peer_filter: PeerFilter) -> tuple[int, list[pb.Peer], ApiStatus]:
        """The peers one client sees, encoded, at one revision, with the status at that revision."""
        revision, peers, status = self.peers.state()
        grouped = snapshot_peers(peers, peer_filter, self.peers.self_uid)
        return revision, [self.encoder.encode(g) for g in grouped], status.status

    def _stream(
        self, request: pb.WatchPeersRequest, peer_filter: PeerFilter, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPeersResponse]:
        if not self._wait_synced(context):
            return
        history_id = self.peers.history_id
        wants_resume = bool(request.resume_history_id or request.resume_revision)
        resumed_status = (
            self.peers.status_at(request.resume_revision)
            if wants_resume and self.peers.covers(request.resume_history_id, request.resume_revision)
            else None
        )
        if resumed_status is not None:
            cursor = request.resume_revision
            yield pb.WatchPeersResponse(
                revision=cursor, history_id=history_id, resumed=pb.Resumed(status=API_STATUS[resumed_status])
            )
            self._sent["resumed"].inc()
        else:
            reason = pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE if wants_resume else pb.SNAPSHOT_REASON_INITIAL
            cursor, messages = self._snapshot(peer_filter, reason)
            yield from messages
            self._sent["snapshot"].inc()
        while context.is_active() and not self.peers.closed:
            entries = self.peers.wait_entries(cursor, WAKE_INTERVAL, BATCH_LIMIT)
            if entries is None:
                self.log.info("client fell behind the history; sending a fresh snapshot", revision=cursor)
                cursor, messages = self._snapshot(peer_filter, pb.SNAPSHOT_REASON_CLIENT_TOO_SLOW)
                yield from messages
                self._sent["snapshot"].inc()
                continue
            if not entries:
                continue
            for projected in project(entries, peer_filter, self.peers.self_uid):
                yield from self._to_pb(projected, history_id)
                if projected.received is not None:
                    self.metrics.propagation_lag.observe(time.monotonic() - projected.received)
            cursor = entries[-1].revision

    def _to_pb(self, message: DeltaMessage | StatusMessage, history_id: str) -> list[pb.WatchPeersResponse]:
        if isinstance(message, StatusMessage):
            self._sent["status"].inc()
            status = pb.StatusChange(status=API_STATUS[message.change.status], reason=message.change.reason)
            return [pb.WatchPeersResponse(revision=message.revision, history_id=history_id, status=status)]
        self._sent["delta"].inc()
        events = [pb.PeerEvent(type=EVENT_TYPE[e.type], peer=self.encoder.encode(e.peer)) for e in message.events]
        parts = split_by_size(events, lambda e: e.ByteSize())
        return [
            pb.WatchPeersResponse(
                revision=message.revision,
                history_id=history_id,
                delta=pb.Delta(events=part),
                partial=index < len(parts) - 1,
            )
            for index, part in enumerate(parts)
        ]

    # -- unary calls ------------------------------------------------------------------------------------
    def ListPeers(self, request: pb.ListPeersRequest, context: grpc.ServicerContext) -> pb.ListPeersResponse:
        try:
            peer_filter = filter_from_pb(request.filter)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        remaining = context.time_remaining()
        if not self.peers.wait_synced(min(remaining, 3600) if remaining is not None else 3600):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar has not synced with the API server yet")
        revision, peers, status = self._filtered_peers(peer_filter)
        return pb.ListPeersResponse(
            revision=revision, history_id=self.peers.history_id, peers=peers, status=API_STATUS[status]
        )

    def GetSelf(self, request: pb.GetSelfRequest, context: grpc.ServicerContext) -> pb.GetSelfResponse:
        identity = self.identity
        response = pb.GetSelfResponse(
            name=identity.name,
            namespace=identity.namespace,
            uid=identity.uid,
            instance_id=instance_id(identity.name),
            instance_id_hex=format(instance_id(identity.name), "x"),
        )
        if self.publisher is not None:
            state = self.publisher.registration()
            response.registered = state.registered
            response.metadata_resource_version = state.resource_version
            response.data.CopyFrom(to_struct(state.data))
            response.data_json = canonical_json(state.data)
            response.labels.update(state.labels)
        return response

    def PublishMetadata(
        self, request: pb.PublishMetadataRequest, context: grpc.ServicerContext
    ) -> pb.PublishMetadataResponse:
        if self.publisher is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this sidecar does not register the pod")
        try:
            document = document_from_publish(request)
            applied = self.publisher.publish(document, merge=request.mode == pb.PUBLISH_MODE_MERGE_PATCH)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RegistrationError as exc:
            context.abort(publish_error_code(exc), str(exc))
        return pb.PublishMetadataResponse(
            metadata_resource_version=applied.resource_version, data_json=canonical_json(applied.data)
        )


class GrpcServer:
    """The server with Discovery, health and reflection, bound to loopback or a Unix socket.

    Owns the gRPC server and its executor (gRPC does not shut down an executor it is given)."""

    def __init__(self, service: DiscoveryService, listen: ListenAddress) -> None:
        self.listen = listen
        # gRPC does not shut down an executor it is given: keep it, to stop its threads in stop().
        self.executor = futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8, thread_name_prefix="grpc")
        self.server = grpc.server(self.executor, maximum_concurrent_rpcs=MAX_STREAMS)
        pb_grpc.add_DiscoveryServicer_to_server(service, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        if listen.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.unix_path)  # a socket left by a previous run of this container
        self.port = self.server.add_insecure_port(listen.grpc_target)
        if not listen.unix_path and self.port == 0:
            raise OSError(f"cannot listen on {listen.grpc_target}")
        self.set_serving(False)

    @property
    def target(self) -> str:
        """What a client dials (the real port when 0 was asked for)."""
        if self.listen.unix_path:
            return self.listen.grpc_target
        return ListenAddress(host=self.listen.host, port=self.port).grpc_target

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
        self.executor.shutdown(wait=True, cancel_futures=True)
