"""A Python client of the local API, for the main container.

``DiscoveryClient.watch()`` (and ``AsyncDiscoveryClient.watch()``) yield a ``PeerSetUpdate`` after
every message: what changed and the whole current peer set. When the stream breaks (the sidecar
restarts, a deadline, a network hiccup on a Unix socket) the client reconnects with backoff and
resumes from the last revision it applied: the sidecar then sends only what was missed, or a fresh
snapshot flagged ``reset=True`` when it no longer holds that history. Callers never see the seams.

The reconnect logic (what to ask for, what a message means, whether and how long to wait after an
error) is ``_ResumableWatch``, written once; each client's ``watch`` only does its kind of IO.

Metadata the main container published is kept in force across a restart of the sidecar: the client
remembers the document as last applied and, whenever its channel comes back after losing the sidecar,
compares it with what the sidecar holds (``GetSelf``) and publishes it again if they differ. A sidecar
stopped gracefully deletes the pod's CR and its successor starts from ``DISCOVERY_METADATA``; without
this, runtime metadata would be silently rolled back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc

# A library logs through the standard library: the application decides where it goes (structlog users
# route it with structlog.stdlib).
log = logging.getLogger("discovery_client")

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_RECEIVE_BYTES = 256 * 2**20
"""This client's receive limit; ListPeers tells the sidecar so (``max_reply_bytes``)."""
CHANNEL_OPTIONS = [
    # ListPeers answers in one message; 10,000 peers with metadata are well over gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    # The sidecar is on loopback or a Unix socket and often starts moments before its client: retry the
    # connection quickly instead of gRPC's default 1 s (growing to 120 s) backoff. Not
    # ``grpc.min_reconnect_backoff_ms``: despite its name, gRPC core uses it as the deadline of each
    # connection attempt (20 s by default), and at 100 ms a sidecar paused that long (a CPU-throttled
    # container) would see its client give up on every attempt.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
PERMANENT_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
)


class _Retries:
    """Delays between reconnects: doubling from ``initial`` up to ``maximum``, each drawn between half the
    bound and the bound, so that many clients of one restarted sidecar do not return in lockstep."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0

    def next_delay(self) -> float:
        bound = min(self.maximum, self.initial * 2 ** min(self.attempts, 64))
        self.attempts += 1
        return random.uniform(bound / 2, bound)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class PeerSetUpdate:
    """One applied message: the changes it brought and the resulting peer set.

    Made by ``PeerSetView.apply`` and yielded to the callers of ``watch``. ``peers`` is the view's own
    dict (not a copy): it is the current set, and moves on with later messages.
    """

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

    Owns the peer set by pod UID, the revision and history id to resume from, the API status and the
    parts of an incomplete change. Used by ``_ResumableWatch`` (so by both clients' ``watch``), and
    directly by programs that read a WatchPeers stream themselves.
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
    endpoint: str = "",
    model: str = "",
) -> pb.PeerFilter:
    """A request filter. ``endpoint`` ("ns.component.endpoint" or "dyn://...") and ``model`` ask Dynamo's
    questions: peers serving that endpoint / that model, whatever their labels."""
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups or [])
    return pb.PeerFilter(
        selector=selector,
        groups=[pb.PeerGroup(name=n, selector=s) for n, s in items],
        include_self=include_self,
        ready_only=ready_only,
        endpoint=endpoint,
        model=model,
    )


class _ResumableWatch:
    """One WatchPeers subscription across reconnects: all of ``watch`` but the IO, shared by both clients.

    Owns the ``PeerSetView`` (the peer set and where to resume), the delays between reconnects
    (0.1 s growing to ``max_backoff``, reset by any message) and the filter. ``DiscoveryClient.watch``
    and ``AsyncDiscoveryClient.watch`` make one per call and ask it what to send (``request``), what a
    message means (``on_message``) and, when the stream fails, whether to retry and after how long
    (``on_error``); they only make the call, read it and sleep.
    """

    INITIAL_BACKOFF = 0.1

    def __init__(
        self,
        peer_filter: pb.PeerFilter | None = None,
        *,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        view: PeerSetView | None = None,
    ) -> None:
        self.filter = peer_filter or pb.PeerFilter()
        self.reconnect = reconnect
        self.view = view if view is not None else PeerSetView()
        self.backoff = _Retries(initial=self.INITIAL_BACKOFF, maximum=max_backoff)

    def request(self) -> pb.WatchPeersRequest:
        """The request of the next call: the filter, resuming after the last complete change."""
        return self.view.resume_request(self.filter)

    def on_message(self, message: pb.WatchPeersResponse) -> PeerSetUpdate | None:
        """Apply a message (the stream is healthy again); the update to yield, or None mid-change."""
        self.backoff.reset()
        return self.view.apply(message)

    def on_error(self, error: grpc.RpcError) -> float:
        """How long to wait before reconnecting after ``error`` ended the stream.

        Re-raises ``error`` when reconnecting is off, its code is permanent, or it is CANCELLED (the
        caller's own doing: the channel was closed or the call cancelled).
        """
        if not self.reconnect or error.code() in PERMANENT_CODES or error.code() == grpc.StatusCode.CANCELLED:
            raise error
        return self.backoff.next_delay()


class DiscoveryClient:
    """A blocking client of the sidecar's local API, for the main container's threads.

    Owns one gRPC channel to ``target`` and its stub (close it, or use it as a context manager).
    Called by application code and the ``peers`` CLI command; each ``watch`` call reconnects on its own.
    """

    def __init__(self, target: str = DEFAULT_TARGET, republish: bool = True) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub: Any = pb_grpc.DiscoveryStub(self.channel)  # generated without type hints
        self.republish = republish
        # _publish_lock serialises publishing (the caller's and the re-publisher's) and guards _published:
        # the document as the sidecar last applied it, None before the first publish.
        self._publish_lock = threading.Lock()
        self._published: dict[str, Any] | None = None
        self._watching_connectivity = False
        # _recovery_lock guards _recheck (the channel left READY since the last check began) and _recovering
        # (a thread is checking): at most one such thread, and no loss of READY goes unchecked.
        self._recovery_lock = threading.Lock()
        self._recheck = False
        self._recovering = False
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        if self._watching_connectivity:
            self.channel.unsubscribe(self._on_connectivity)
            self._wait_connectivity_poller()
        self.channel.close()

    def _wait_connectivity_poller(self, timeout: float = 1.0) -> None:
        """Let gRPC's connectivity-polling thread notice the unsubscription before the channel closes.

        It wakes every 0.2 s; closing the channel under it makes it die with "Cannot monitor channel state:
        Channel closed!". Its flag is private to grpcio: without it, wait one polling period.
        """
        state = getattr(self.channel, "_connectivity_state", None)
        if state is None or not hasattr(state, "polling"):
            time.sleep(0.25)
            return
        deadline = time.monotonic() + timeout
        while state.polling and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> DiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_peers(self, peer_filter: pb.PeerFilter | None = None, timeout: float = 30.0) -> pb.ListPeersResponse:
        reply: pb.ListPeersResponse = self.stub.ListPeers(
            pb.ListPeersRequest(filter=peer_filter or pb.PeerFilter(), max_reply_bytes=MAX_RECEIVE_BYTES),
            timeout=timeout,
            wait_for_ready=True,
        )
        return reply

    def get_self(self, timeout: float = 10.0) -> pb.GetSelfResponse:
        reply: pb.GetSelfResponse = self.stub.GetSelf(pb.GetSelfRequest(), timeout=timeout, wait_for_ready=True)
        return reply

    def publish_metadata(
        self, data: Mapping[str, Any], merge: bool = False, timeout: float = 30.0
    ) -> pb.PublishMetadataResponse:
        """Replace (or merge-patch) this pod's metadata; once applied, it is also re-published after a
        restart of the sidecar (unless the client was made with ``republish=False``)."""
        mode = pb.PUBLISH_MODE_MERGE_PATCH if merge else pb.PUBLISH_MODE_REPLACE
        request = pb.PublishMetadataRequest(data_json=json.dumps(dict(data)), mode=mode)
        with self._publish_lock:
            reply: pb.PublishMetadataResponse = self.stub.PublishMetadata(
                request, timeout=timeout, wait_for_ready=True
            )
            self._published = json.loads(reply.data_json) if reply.data_json else {}
        if self.republish and not self._watching_connectivity:
            self._watching_connectivity = True
            self.channel.subscribe(self._on_connectivity)
        return reply

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        """gRPC's connectivity callback (its own thread; must not block).

        Leaving READY means the sidecar may have gone away (IDLE when it said goodbye, TRANSIENT_FAILURE when
        it did not; an idle timeout looks the same and costs one GetSelf). gRPC does not reconnect an idle
        channel by itself, so a thread does: ``ensure_published`` connects, waiting for the sidecar, and
        checks that it holds the metadata.
        """
        if state is grpc.ChannelConnectivity.READY:
            return
        with self._recovery_lock:
            self._recheck = True
            if self._recovering:
                return  # the running thread sees _recheck and checks once more
            self._recovering = True
        threading.Thread(target=self._recover, name="discovery-republish", daemon=True).start()

    def _recover(self) -> None:
        while True:
            with self._recovery_lock:
                if not self._recheck or self._closed.is_set():
                    self._recovering = False
                    return
                self._recheck = False
            self.ensure_published(attempts=None)

    def ensure_published(self, attempts: int | None = 20) -> bool:
        """Publish the last applied metadata again if the sidecar holds other data (it restarted).

        True when the sidecar holds it (already, or after publishing); False when it refused for good
        (e.g. watch-only) or could not be reached in ``attempts`` tries (None: until the client is
        closed). Called after the channel lost the sidecar; safe to call any time.
        """
        backoff = _Retries(initial=0.1, maximum=2.0)
        tries = 0
        while attempts is None or tries < attempts:
            tries += 1
            if self._closed.is_set():
                return False
            try:
                with self._publish_lock:
                    if self._published is None:
                        return True
                    held = self.get_self(timeout=10.0).data_json
                    if held and json.loads(held) == self._published:
                        return True
                    request = pb.PublishMetadataRequest(
                        data_json=json.dumps(self._published), mode=pb.PUBLISH_MODE_REPLACE
                    )
                    self.stub.PublishMetadata(request, timeout=30.0, wait_for_ready=True)
                log.info("re-published metadata after the sidecar restarted (target %s)", self.target)
                return True
            except grpc.RpcError as exc:
                if exc.code() in (*PERMANENT_CODES, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED):
                    log.warning("cannot re-publish metadata to %s: %s %s", self.target, exc.code().name, exc.details())
                    return False
            except ValueError:  # closed channel
                return False
            self._closed.wait(backoff.next_delay())
        log.warning("gave up re-publishing metadata to %s after %s attempts", self.target, attempts)
        return False

    def watch(
        self,
        peer_filter: pb.PeerFilter | None = None,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        view: PeerSetView | None = None,
    ) -> Iterator[PeerSetUpdate]:
        """Yield an update per message, reconnecting and resuming by revision until closed."""
        watch = _ResumableWatch(peer_filter, reconnect=reconnect, max_backoff=max_backoff, view=view)
        while True:
            call = self.stub.WatchPeers(watch.request(), wait_for_ready=True)
            try:
                for message in call:
                    update = watch.on_message(message)
                    if update is not None:
                        yield update
                return  # the server ended the stream cleanly
            except grpc.RpcError as error:
                delay = watch.on_error(error)
            finally:
                call.cancel()
            time.sleep(delay)


class AsyncDiscoveryClient:
    """The same for asyncio programs (``grpc.aio``).

    Owns one ``grpc.aio`` channel to ``target`` and its stub (``await close()`` it). Called by asyncio
    application code; each ``watch`` call reconnects on its own.
    """

    def __init__(self, target: str = DEFAULT_TARGET) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub: Any = pb_grpc.DiscoveryStub(self.channel)  # generated without type hints

    async def close(self) -> None:
        await self.channel.close(None)  # None: no grace (the stubs omit the parameter's default)

    async def list_peers(self, peer_filter: pb.PeerFilter | None = None, timeout: float = 30.0) -> pb.ListPeersResponse:
        reply: pb.ListPeersResponse = await self.stub.ListPeers(
            pb.ListPeersRequest(filter=peer_filter or pb.PeerFilter(), max_reply_bytes=MAX_RECEIVE_BYTES),
            timeout=timeout,
            wait_for_ready=True,
        )
        return reply

    async def watch(
        self, peer_filter: pb.PeerFilter | None = None, reconnect: bool = True, max_backoff: float = 5.0
    ) -> AsyncIterator[PeerSetUpdate]:
        """Yield an update per message, reconnecting and resuming by revision until closed."""
        watch = _ResumableWatch(peer_filter, reconnect=reconnect, max_backoff=max_backoff)
        while True:
            call = self.stub.WatchPeers(watch.request(), wait_for_ready=True)
            try:
                async for message in call:
                    update = watch.on_message(message)
                    if update is not None:
                        yield update
                return  # the server ended the stream cleanly
            except grpc.aio.AioRpcError as error:
                delay = watch.on_error(error)
            finally:
                call.cancel()
            await asyncio.sleep(delay)


def snapshot_peers(
    target: str = DEFAULT_TARGET, peer_filter: pb.PeerFilter | None = None, timeout: float = 30.0
) -> dict[str, pb.Peer]:
    """The current peer set by pod UID, in one call: connect, ``ListPeers`` (which waits for the sidecar's
    first sync within ``timeout``), close. For scripts and start-up checks; long-lived programs ``watch``."""
    with DiscoveryClient(target, republish=False) as client:
        return {peer.uid: peer for peer in client.list_peers(peer_filter, timeout=timeout).peers}
