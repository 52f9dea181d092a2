"""Which relay replica a follower dials next, and whether it waits before dialling.

A sidecar following the relay tier (``sidecar.kube.upstream``) and the benchmark's simulated followers
(``bench.peer_subscribers``) decide the same way, so what the benchmark measures of a failover is what
sidecars do:

* a failed stream moves to another replica at once, since another replica is probably fine, chosen at random
  among those not tried yet in this run of failures: the followers of a replica that died spread evenly over
  the others (taking the next one in the list sent every one of them to the same replica, which then owed
  hundreds of snapshots while its peers idled: bench/COST_MODEL.md);
* only once every replica has failed in a row does the follower back off (``Backoff``: jittered, growing to
  ``DISCOVERY_BACKOFF_MAX``), so a tier that is down or overloaded is not hammered by every follower at once;
* a stream that delivered its snapshot (or resume) starts a new run: its end is a first failure again;
* a refusal (the follower's token or namespaces) backs off at once: every replica would refuse the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReplicaRotation:
    """Owns one follower's choice of replica: the replicas tried in the current run of failures, the one dialled
    last, and the count of failures in a row. ``first``: the replica of the first dial (None: at random)."""

    first: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)
    failed_in_a_row: int = 0
    _tried: set[int] = field(default_factory=set, repr=False)
    _last: int | None = field(default=None, repr=False)

    def pick(self, replicas: int) -> int:
        """The index of the replica to dial now, among ``replicas`` (at least 1; the list may change between
        picks): one not tried in this run of failures, at random."""
        if replicas < 1:
            raise ValueError("no replica to pick from")
        if self._last is None and self.first is not None:
            index = self.first % replicas
        else:
            untried = [i for i in range(replicas) if i not in self._tried]
            if not untried:
                self._tried.clear()
                untried = list(range(replicas))
            index = self.rng.choice(untried)
        self._tried.add(index)
        self._last = index
        return index

    def ended(self, replicas: int, delivered: bool, refused: bool = False) -> bool:
        """Record the end of a stream on the replica picked last; True when the follower must back off before
        the next dial.

        ``delivered``: the stream brought a snapshot or a resume (the replica served this follower).
        ``refused``: the replica refused the follower, which always backs off."""
        if delivered:
            self.failed_in_a_row = 0
            self._tried = {self._last} if self._last is not None else set()
        self.failed_in_a_row += 1
        if refused or self.failed_in_a_row >= replicas:
            self.failed_in_a_row = 0
            self._tried.clear()
            return True
        return False
