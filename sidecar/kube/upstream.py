"""The peers of a sidecar that follows a relay: one ``WatchPeers`` stream upstream, as a source of the hub.

With ``DISCOVERY_UPSTREAM`` set, the sidecar watches nothing on the API server for peers (its registration
and the watch of its own CR stay as they are): the relay (``discovery-sidecar relay``) has joined the
peers already, and this source writes each one it receives into the hub as a ``RelayedPeer``
(``sidecar.core.relayed_join`` passes them through). The main container is served from the sidecar's own
hub, under the sidecar's own revisions, exactly as when it watches the API server.

What the relay can filter is pushed to it: the namespaces (request metadata, which the relay authorises
against the token presented) and ``DISCOVERY_PEER_SELECTOR``. Everything a main container asks for on
top (selectors, groups, endpoint, model, itself) is applied by the sidecar, as always.

Failover: replicas are interchangeable. A stream that breaks (a replica killed or drained) makes the
source unhealthy (the main container's stream says DEGRADED, its peer set is kept) and another address,
one not yet tried, at random, is dialled at once; only when every address failed in a row is there a backoff
(``sidecar.core.failover``). The resume position is
the relay's (``history_id``, revision): the same replica resumes with what was missed; another one cannot
(its history is its own) and sends a snapshot, which ``replace`` diffs against the peers held, so the
main container sees only the real changes: nothing lost, nothing invented.

The token is the one the sidecar shows the API server (``KubeApi.bearer_token``: in a pod the projected
service-account token, re-read as it rotates), sent on every new stream.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import structlog

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import PeerSetUpdate, PeerSetView
from sidecar.core.failover import ReplicaRotation
from sidecar.core.peer import Document, Peer, PeerState, PortInfo
from sidecar.core.records import RelayedPeer
from sidecar.core.selectors import LabelSelector
from sidecar.core.workers import Worker
from sidecar.peers.backend import Upstream
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import SourceStore
from sidecar.peers.source_loop import SourceLoop

SOURCE = "upstream"
"""The hub's name for this source (its key space, its label in logs and in DEGRADED reasons)."""
NAMESPACES_METADATA = "discovery-namespaces"  # as sidecar.serve.grpc_service reads it on the relay
STATE = {pb.PEER_STATE_READY: PeerState.READY, pb.PEER_STATE_DRAINING: PeerState.DRAINING}
REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION)
"""Answers that need a human (RBAC, the token, the relay's namespaces): retried with backoff, logged as errors."""
CHANNEL_OPTIONS = [
    # A replica that vanishes without closing its connections (a node lost) is noticed within ~30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 2**20),  # a relay sends parts of at most ~1 MiB
]


def peer_from_pb(message: pb.Peer) -> Peer:
    """The core's peer from the relay's message (the inverse of ``sidecar.serve.wire.encode_peer``): the
    data from its exact JSON text, so the same peer from two replicas is equal and diffs to nothing."""
    data = json.loads(message.data_json) if message.data_json else {}
    if not isinstance(data, dict):
        raise ValueError(f"peer {message.name}: data_json is not a JSON object")
    return Peer(
        uid=message.uid,
        name=message.name,
        namespace=message.namespace,
        instance_id=message.instance_id,
        addresses=tuple(message.addresses),
        ports=tuple(
            PortInfo(port=p.port, name=p.name, protocol=p.protocol, app_protocol=p.app_protocol) for p in message.ports
        ),
        labels=dict(message.labels),
        state=STATE.get(message.state, PeerState.READY),
        document=Document(data, len(message.data_json.encode())),
        node_name=message.node_name,
        zone=message.zone,
        hostname=message.hostname,
        container=message.container,
        workers=tuple(
            Worker(
                url=w.url,
                port=w.port,
                protocol=w.protocol,
                bootstrap_port=w.bootstrap_port if w.HasField("bootstrap_port") else None,
                model_id=w.model_id,
                kv_connector=w.kv_connector,
                kv_engine_id=w.kv_engine_id,
            )
            for w in message.workers
        ),
    )


def resolve(targets: Sequence[tuple[str, int]]) -> list[tuple[str, str]]:
    """Every replica to try, as (what to dial, the name its certificate must carry): each address of each
    host (a headless Service's name resolves to every ready replica), in the order given."""
    replicas: list[tuple[str, str]] = []
    for host, port in targets:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for family, _, _, _, sockaddr in infos:
            address = str(sockaddr[0])
            dial = f"ipv6:[{address}]:{port}" if family == socket.AF_INET6 else f"ipv4:{address}:{port}"
            if (dial, host) not in replicas:
                replicas.append((dial, host))
    return replicas


class _Call:
    """What ``SourceLoop.stop`` closes: the stream and its channel."""

    def __init__(self, channel: grpc.Channel, call: Any) -> None:
        self.channel = channel
        self.call = call

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


class UpstreamSource(SourceLoop):
    """Follows the relay tier into the hub. Owns its thread (``SourceLoop``), the view of the current
    stream's peer set and resume position (the loop's thread only), and the rotation over replicas."""

    def __init__(
        self,
        store: SourceStore,
        upstream: Upstream,
        namespaces: Sequence[str],
        peer_selector: LabelSelector | None,
        token: Callable[[], str],
        metrics: Metrics,
        backoff_max: float,
    ) -> None:
        super().__init__(store, structlog.get_logger("sidecar.upstream"), backoff_max, thread_name="upstream")
        self.upstream = upstream
        self.namespaces = tuple(namespaces)
        self.peer_filter = pb.PeerFilter(
            selector=str(peer_selector) if peer_selector is not None else "", include_self=True
        )
        self.token = token
        self.metrics = metrics
        with open(upstream.ca_file, "rb") as file:
            self._credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
        self._view = PeerSetView()
        # Which replica to dial next (at random: sidecars spread over the replicas), and when to back off.
        self._rotation = ReplicaRotation()
        self.replica = ""  # the replica followed now, for logs and tests ("" between streams)
        self._delivered = False  # the current stream brought this sidecar a snapshot or a resume

    def run(self) -> None:
        while not self._stop.is_set():
            replicas = resolve(self.upstream.targets)
            if not replicas:
                names = ", ".join(f"{h}:{p}" for h, p in self.upstream.targets)
                self._retry_later("cannot resolve the relay", f"no address for {names}", "is the relay Service up?")
                continue
            dial, host = replicas[self._rotation.pick(len(replicas))]
            self._delivered = False
            hint: str | None = None
            needs_human = False
            try:
                self._follow(dial, host)
                reason = f"relay {dial} ended the stream"
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                reason = f"relay {dial}: {code.name}: {exc.details() if hasattr(exc, 'details') else exc}"
                needs_human = code in REFUSALS
                if needs_human:
                    hint = "the relay refused this sidecar's token or namespaces: see the reason"
            except ValueError as exc:  # a peer this sidecar cannot read: the relay is not what it should be
                reason = f"relay {dial} sent an unreadable peer: {exc}"
            finally:
                self.replica = ""
            if self._stop.is_set():
                return
            if not self._rotation.ended(len(replicas), self._delivered, refused=needs_human):
                # Another replica at once: the peers are kept meanwhile, and said DEGRADED.
                self.log.warning("lost the relay; moving to another replica", reason=reason)
                self._set_unhealthy(reason)
                continue
            self._retry_later("cannot follow any relay replica", reason, hint, needs_human)

    def _set_unhealthy(self, reason: str) -> None:
        if self._healthy:
            self._healthy = False
            self._outage_since = time.monotonic()
            self._outage_attempts = 0
        self.store.set_health(False, reason)

    def _follow(self, dial: str, host: str) -> None:
        """One stream from one replica, until it ends; raises ``grpc.RpcError`` when it breaks."""
        channel = grpc.secure_channel(
            dial, self._credentials, options=[("grpc.ssl_target_name_override", host), *CHANNEL_OPTIONS]
        )
        metadata = [(NAMESPACES_METADATA, ",".join(n or "*" for n in self.namespaces))]
        token = self.token()
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        call = pb_grpc.DiscoveryStub(channel).WatchPeers(self._view.resume_request(self.peer_filter), metadata=metadata)
        self._hold_stream(_Call(channel, call))
        try:
            if self._stop.is_set():
                return
            self.replica = dial
            for message in call:
                update = self._view.apply(message)
                if update is not None:
                    self._apply(update, dial)
        finally:
            self._hold_stream(None)
            call.cancel()
            channel.close()

    def _apply(self, update: PeerSetUpdate, dial: str) -> None:
        received = time.monotonic()
        if update.kind == "snapshot":
            # Another replica's (or a fresh) snapshot: the directory diffs it against what is held.
            changes = self.store.replace(
                {uid: RelayedPeer(peer_from_pb(p)) for uid, p in self._view.peers.items()}, received
            )
            self.backoff.reset()
            self._delivered = True
            self.log.info("following a relay", replica=dial, peers=len(self._view.peers), changes=changes)
        elif update.kind == "delta":
            for message in [*update.added, *update.updated]:
                self.store.upsert(message.uid, RelayedPeer(peer_from_pb(message)), received)
            for message in update.removed:
                self.store.delete(message.uid, received)
        elif update.kind == "resumed":
            self.backoff.reset()
            self._delivered = True
            self.log.info("resumed from the relay", replica=dial, revision=update.revision)
        if update.connected:
            self._report_healthy("following the relay again")
        else:
            self._set_unhealthy(f"relay {dial}: {update.status_reason or 'the relay has lost the API server'}")
