"""The join of a sidecar that follows a relay: peers arrive joined, so it passes them through.

A relay (``discovery-sidecar relay``) runs the Kubernetes join on its own watches and serves the result
over ``WatchPeers``; the sidecar's upstream source writes each received peer as a ``RelayedPeer`` under
the peer's key. Keeping the directory (and so the hub, the log and every client's projection) in the
path, rather than forwarding the relay's stream, is what gives the main container the sidecar's own
revisions: a relay replaced by another one is a ``replace`` of this one source, which the directory
diffs, so the main container sees only what really changed.
"""

from __future__ import annotations

from sidecar.core.peer import Peer
from sidecar.core.records import Record, RelayedPeer


class RelayedJoin:
    """Owns the relayed peers by key (one source writes them); a ``Join`` for ``PeerDirectory``.

    The directory prefixes keys with the source's name; the peer key is the peer's own ``uid``.
    """

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}  # directory key -> peer
        self._keys: dict[str, str] = {}  # peer key -> directory key

    def upsert(self, key: str, record: Record) -> set[str]:
        if not isinstance(record, RelayedPeer):
            return set()
        old = self._peers.get(key)
        self._peers[key] = record.peer
        self._keys[record.peer.uid] = key
        affected = {record.peer.uid}
        if old is not None and old.uid != record.peer.uid:
            self._keys.pop(old.uid, None)
            affected.add(old.uid)
        return affected

    def delete(self, key: str) -> set[str]:
        old = self._peers.pop(key, None)
        if old is None:
            return set()
        if self._keys.get(old.uid) == key:
            del self._keys[old.uid]
        return {old.uid}

    def peer(self, peer_key: str) -> Peer | None:
        key = self._keys.get(peer_key)
        return None if key is None else self._peers.get(key)
