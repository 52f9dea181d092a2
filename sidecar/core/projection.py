"""What one client sees: the log projected through its filter, coalesced per peer.

Projection is stateless. A log entry carries the peer before and after the change, so whether it is
an addition, an update or a removal *for this client* follows from whether the filter matched before
and after (a label change can move a peer out of a client's selector: a removal for that client only).
Because nothing per client is remembered, a client that resumes at revision R is served by projecting
the entries after R, exactly as if it had never left.

Coalescing: a batch of entries is folded to one event per peer (first ``before``, last ``after``), so
a client that reads slowly receives the net change, and a peer that flapped and came back as it was
produces nothing at all.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sidecar.core.dynamo_entries import EndpointPath
from sidecar.core.eventlog import ApiStatus, LogEntry, PeerChange, StatusChange
from sidecar.core.peer import Peer, PeerState
from sidecar.core.selectors import EVERYTHING, LabelSelector


@dataclass(frozen=True)
class PeerFilter:
    """What one client asked to see: a selector, named groups, whether to include itself or draining peers,
    and Dynamo's questions (serving this endpoint, serving this model). Every condition must hold."""

    selector: LabelSelector = EVERYTHING
    groups: tuple[tuple[str, LabelSelector], ...] = ()
    include_self: bool = False
    ready_only: bool = False
    endpoint: EndpointPath | None = None
    model: str = ""
    # The namespaces this client may see (a relay's authorised scope, never a client's own choice); None:
    # every namespace the peer set holds.
    namespaces: frozenset[str] | None = None

    def groups_of(self, peer: Peer, self_uid: str) -> tuple[str, ...] | None:
        """The group names ``peer`` is in, or None when the filter excludes it."""
        if peer.uid == self_uid and not self.include_self:
            return None
        if self.ready_only and peer.state is not PeerState.READY:
            return None
        if self.namespaces is not None and peer.namespace not in self.namespaces:
            return None
        if not self.selector.matches(peer.labels):
            return None
        if self.endpoint is not None and not peer.dynamo.serves(self.endpoint):
            return None
        if self.model and not peer.dynamo.has_model(self.model):
            return None
        if not self.groups:
            return ()
        names = tuple(name for name, selector in self.groups if selector.matches(peer.labels))
        return names or None


@dataclass(frozen=True)
class GroupedPeer:
    """A peer as one client sees it: with the names of the client's groups it belongs to."""

    peer: Peer
    groups: tuple[str, ...]


class EventType(enum.Enum):
    """What a change is for one client (after its filter), not for the cluster."""

    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True)
class ClientEvent:
    """One peer added, updated or removed for one client."""

    type: EventType
    peer: GroupedPeer


@dataclass(frozen=True)
class DeltaMessage:
    """Coalesced peer events up to ``revision``; ``received``: when that revision's cause arrived."""

    revision: int
    events: tuple[ClientEvent, ...]
    received: float | None = None


@dataclass(frozen=True)
class StatusMessage:
    """The API status changed at ``revision``."""

    revision: int
    change: StatusChange
    received: float | None = None


Message = DeltaMessage | StatusMessage


def grouped_peer(peer: Peer | None, peer_filter: PeerFilter, self_uid: str) -> GroupedPeer | None:
    if peer is None:
        return None
    groups = peer_filter.groups_of(peer, self_uid)
    return None if groups is None else GroupedPeer(peer, groups)


def snapshot_peers(peers: Iterable[Peer], peer_filter: PeerFilter, self_uid: str) -> list[GroupedPeer]:
    """The filtered peer set in a stable order (namespace, name, uid)."""
    grouped = (grouped_peer(p, peer_filter, self_uid) for p in peers)
    return sorted((g for g in grouped if g is not None), key=lambda g: (g.peer.namespace, g.peer.name, g.peer.uid))


def classify(before: GroupedPeer | None, after: GroupedPeer | None) -> ClientEvent | None:
    if before is None:
        return None if after is None else ClientEvent(EventType.ADDED, after)
    if after is None:
        return ClientEvent(EventType.REMOVED, before)
    return None if before == after else ClientEvent(EventType.UPDATED, after)


def _fold(changes: Sequence[PeerChange], peer_filter: PeerFilter, self_uid: str) -> list[ClientEvent]:
    first_before: dict[str, Peer | None] = {}
    last_after: dict[str, Peer | None] = {}
    for change in changes:
        first_before.setdefault(change.uid, change.before)
        last_after.pop(change.uid, None)  # re-insert: order by each peer's latest change
        last_after[change.uid] = change.after
    events = []
    for uid, after in last_after.items():
        event = classify(
            grouped_peer(first_before[uid], peer_filter, self_uid), grouped_peer(after, peer_filter, self_uid)
        )
        if event is not None:
            events.append(event)
    return events


def project(entries: Sequence[LogEntry], peer_filter: PeerFilter, self_uid: str) -> list[Message]:
    """Turn consecutive log entries into the messages one client is sent.

    Runs of peer changes become one coalesced ``DeltaMessage`` (skipped when the filter leaves nothing);
    a status change is its own message, in order. Each message's revision is that of the last entry it
    accounts for, so a client that applied it can resume from there.
    """
    messages: list[Message] = []
    run: list[PeerChange] = []
    last: LogEntry | None = None  # the last entry of the current run

    def close_run() -> None:
        events = _fold(run, peer_filter, self_uid)
        if events and last is not None:
            messages.append(DeltaMessage(last.revision, tuple(events), last.received))
        run.clear()

    for entry in entries:
        if isinstance(entry.change, StatusChange):
            close_run()
            messages.append(StatusMessage(entry.revision, entry.change, entry.received))
        else:
            run.append(entry.change)
            last = entry
    close_run()
    return messages


def status_before(entries: Sequence[LogEntry], current: StatusChange) -> ApiStatus:
    """The API status as of just before ``entries`` (a resumed client is told it), given the current one.

    The first status change among the entries knows what it replaced; without one, nothing changed
    since, so the current status holds.
    """
    for entry in entries:
        if isinstance(entry.change, StatusChange) and entry.change.previous is not None:
            return entry.change.previous
    return current.status
