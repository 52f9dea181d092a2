"""The local gRPC API: ``discovery.v1.Discovery`` plus standard health checking and reflection.

Each ``WatchPeers`` stream is one thread that holds nothing but a cursor (a revision) into the hub's
shared event log. It waits for new entries, projects them through its filter (coalesced per peer)
and sends them. gRPC's flow control blocks a send to a client that does not read; meanwhile the log
moves on without it, and if the client's position falls out of the bounded history it is sent a
fresh snapshot (``SNAPSHOT_REASON_CLIENT_TOO_SLOW``) instead of a backlog. Memory per stream is thus
bounded by one batch, whatever the client does.
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
from sidecar.core.eventlog import ApiStatus, LogEntry, StatusChange
from sidecar.core.instance_id import instance_id
from sidecar.core.peer import canonical_json
from sidecar.core.projection import DeltaMessage, PeerFilter, StatusMessage, project, snapshot_views
from sidecar.hub import PeerHub
from sidecar.kube.api import CONNECTION_ERRORS, ApiError
from sidecar.kube.registration import Registrar, explain
from sidecar.metrics import Metrics
from sidecar.wire import API_STATUS, EVENT_TYPE, document_from_publish, filter_from_pb, peer_to_pb, to_struct

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


def status_at(entries_after: list[LogEntry], current: StatusChange) -> ApiStatus:
    """The API status as of just before ``entries_after`` (status only ever flips between two values)."""
    for entry in entries_after:
        if isinstance(entry.change, StatusChange):
            return ApiStatus.DEGRADED if entry.change.status is ApiStatus.CONNECTED else ApiStatus.CONNECTED
    return current.status


class DiscoveryService(pb_grpc.DiscoveryServicer):
    def __init__(self, hub: PeerHub, registrar: Registrar | None, identity: PodIdentity, metrics: Metrics) -> None:
        self.hub = hub
        self.registrar = registrar
        self.identity = identity
        self.metrics = metrics
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
        if self.hub.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the discovery sidecar is shutting down; reconnect to resume")

    def _wait_synced(self, context: grpc.ServicerContext) -> bool:
        while not self.hub.wait_synced(WAKE_INTERVAL):
            if self.hub.closed or not context.is_active():
                return False
        return True

    def _snapshot(self, peer_filter: PeerFilter, reason: int) -> tuple[int, list[pb.WatchPeersResponse]]:
        """The filtered peer set at one revision, in as many parts as its size needs."""
        revision, peers, status = self.hub.state()
        views = snapshot_views(peers, peer_filter, self.hub.self_uid)
        parts = split_by_size([peer_to_pb(v) for v in views], lambda m: m.ByteSize())
        messages = [
            pb.WatchPeersResponse(
                revision=revision,
                history_id=self.hub.history_id,
                snapshot=pb.Snapshot(peers=part, reason=reason, status=API_STATUS[status.status]),
                partial=index < len(parts) - 1,
            )
            for index, part in enumerate(parts)
        ]
        return revision, messages

    def _stream(
        self, request: pb.WatchPeersRequest, peer_filter: PeerFilter, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPeersResponse]:
        if not self._wait_synced(context):
            return
        history_id = self.hub.history_id
        wants_resume = bool(request.resume_history_id or request.resume_revision)
        if wants_resume and self.hub.covers(request.resume_history_id, request.resume_revision):
            cursor = request.resume_revision
            missed = self.hub.wait_entries(cursor, 0, BATCH_LIMIT) or []
            yield pb.WatchPeersResponse(
                revision=cursor,
                history_id=history_id,
                resumed=pb.Resumed(status=API_STATUS[status_at(missed, self.hub.status())]),
            )
            self._sent["resumed"].inc()
        else:
            reason = pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE if wants_resume else pb.SNAPSHOT_REASON_INITIAL
            cursor, messages = self._snapshot(peer_filter, reason)
            yield from messages
            self._sent["snapshot"].inc()
        while context.is_active() and not self.hub.closed:
            entries = self.hub.wait_entries(cursor, WAKE_INTERVAL, BATCH_LIMIT)
            if entries is None:
                self.log.info("client fell behind the history; sending a fresh snapshot", revision=cursor)
                cursor, messages = self._snapshot(peer_filter, pb.SNAPSHOT_REASON_CLIENT_TOO_SLOW)
                yield from messages
                self._sent["snapshot"].inc()
                continue
            if not entries:
                continue
            for projected in project(entries, peer_filter, self.hub.self_uid):
                yield from self._to_pb(projected, history_id)
                received = self.hub.received_at.get(projected.revision)
                if received is not None:
                    self.metrics.propagation_lag.observe(time.monotonic() - received)
            cursor = entries[-1].revision

    def _to_pb(self, message: DeltaMessage | StatusMessage, history_id: str) -> list[pb.WatchPeersResponse]:
        if isinstance(message, StatusMessage):
            self._sent["status"].inc()
            status = pb.StatusChange(status=API_STATUS[message.change.status], reason=message.change.reason)
            return [pb.WatchPeersResponse(revision=message.revision, history_id=history_id, status=status)]
        self._sent["delta"].inc()
        events = [pb.PeerEvent(type=EVENT_TYPE[e.type], peer=peer_to_pb(e.view)) for e in message.events]
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
        if not self.hub.wait_synced(min(remaining, 3600) if remaining is not None else 3600):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar has not synced with the API server yet")
        revision, peers, status = self.hub.state()
        views = snapshot_views(peers, peer_filter, self.hub.self_uid)
        return pb.ListPeersResponse(
            revision=revision,
            history_id=self.hub.history_id,
            peers=[peer_to_pb(v) for v in views],
            status=API_STATUS[status.status],
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
        if self.registrar is not None:
            state = self.registrar.state()
            response.registered = state.registered
            response.metadata_resource_version = state.resource_version
            response.data.CopyFrom(to_struct(state.data))
            response.data_json = canonical_json(state.data)
            response.labels.update(state.labels)
        return response

    def PublishMetadata(
        self, request: pb.PublishMetadataRequest, context: grpc.ServicerContext
    ) -> pb.PublishMetadataResponse:
        if self.registrar is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this sidecar does not register the pod")
        try:
            document = document_from_publish(request)
            applied = self.registrar.publish(document, merge=request.mode == pb.PUBLISH_MODE_MERGE_PATCH)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ApiError as exc:
            self.metrics.api_errors.labels("publish", str(exc.status)).inc()
            code = {403: grpc.StatusCode.PERMISSION_DENIED, 422: grpc.StatusCode.INVALID_ARGUMENT}.get(
                exc.status, grpc.StatusCode.UNAVAILABLE
            )
            context.abort(code, explain(exc, "publish metadata"))
        except CONNECTION_ERRORS as exc:
            self.metrics.api_errors.labels("publish", "connection").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach the API server: {type(exc).__name__}")
        data = (applied.get("spec") or {}).get("data") or {}
        return pb.PublishMetadataResponse(
            metadata_resource_version=applied["metadata"]["resourceVersion"], data_json=canonical_json(data)
        )


class GrpcServer:
    """The server with Discovery, health and reflection, bound to loopback or a Unix socket."""

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
