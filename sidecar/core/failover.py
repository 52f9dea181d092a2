"""Which relay replica a follower dials next, and whether it waits before dialling.

A sidecar following the relay tier (``sidecar.kube.upstream``) and the benchmark's simulated followers
(``bench.peer_subscribers``) decide the same way, so what the benchmark measures of a failover is what
sidecars do: replicas are tried in turn from a start that differs per follower (spreading followers over
the replicas); a failed stream moves to the next replica at once, since another replica is probably fine;
only once every replica has failed in a row does the follower back off (``Backoff``: jittered, growing to
``DISCOVERY_BACKOFF_MAX``), so a tier that is down or overloaded is not hammered by every follower at once.
A stream that delivered its snapshot (or resume) starts a new run: its end is a first failure again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaRotation:
    """Owns one follower's position in the replica list and its count of failures in a row."""

    next_index: int = 0
    failed_in_a_row: int = 0

    def pick(self, replicas: int) -> int:
        """The index of the replica to dial now, among ``replicas`` (at least 1); the next call picks the next."""
        if replicas < 1:
            raise ValueError("no replica to pick from")
        index = self.next_index % replicas
        self.next_index += 1
        return index

    def ended(self, replicas: int, delivered: bool, refused: bool = False) -> bool:
        """Record the end of a stream on a replica; True when the follower must back off before the next dial.

        ``delivered``: the stream brought a snapshot or a resume (the replica served this follower).
        ``refused``: the replica refused the follower (its token or namespaces: every replica would), which
        always backs off."""
        if delivered:
            self.failed_in_a_row = 0
        self.failed_in_a_row += 1
        if refused or self.failed_in_a_row >= replicas:
            self.failed_in_a_row = 0
            return True
        return False
