"""A relay's memory of who may read what: answers of the API server kept for a short while, then asked again.

A relay authenticates each client's token (a TokenReview) and authorises each namespace it asks for (a
SubjectAccessReview per peer resource). Asking on every call would put a review per sidecar and per
reconnect on the API server, which the relay exists to spare; trusting an answer forever would let a
deleted pod's token, or a revoked Role, keep reading. So answers, granted and refused alike, are kept
for a TTL (``DISCOVERY_RELAY_ACCESS_TTL``), and an open stream is checked again when its answers expire.

Pure: the caller passes the time. The shell (``sidecar.kube.access``) does the asking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Reviewed:
    """Who a token is, as the API server's TokenReview says (what a SubjectAccessReview then asks about)."""

    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer(Generic[V]):
    """One answer and until when (monotonic seconds) it is trusted."""

    value: V
    expires: float


class ExpiringCache(Generic[K, V]):
    """Answers by key, each trusted until it expires; at most ``capacity`` (the soonest to expire go first).

    Owned by one ``KubeAccess``, which guards it with its own lock (several calls are checked at once).
    """

    def __init__(self, ttl: float, capacity: int = 65536) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self.capacity = capacity
        self._answers: dict[K, Answer[V]] = {}

    def get(self, key: K, now: float) -> Answer[V] | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        if now >= answer.expires:
            del self._answers[key]
            return None
        return answer

    def put(self, key: K, value: V, now: float) -> Answer[V]:
        answer = Answer(value, now + self.ttl)
        self._answers[key] = answer
        if len(self._answers) > self.capacity:
            self._evict(now)
        return answer

    def _evict(self, now: float) -> None:
        live = {k: a for k, a in self._answers.items() if a.expires > now}
        if len(live) > self.capacity:
            keep = sorted(live.items(), key=lambda item: item[1].expires)[len(live) - self.capacity :]
            live = dict(keep)
        self._answers = live

    def __len__(self) -> int:
        return len(self._answers)


def token_key(token: str) -> str:
    """What a token is cached under: its digest, so the relay's memory holds no credential."""
    return hashlib.sha256(token.encode()).hexdigest()


def scope_problem(wanted: tuple[str, ...], served: tuple[str, ...]) -> str | None:
    """Why a client cannot be served ``wanted`` namespaces ("" is every namespace) by a relay that watches
    ``served`` (("",): all), or None."""
    if "" in served:
        return None
    if "" in wanted:
        return (
            f"this relay watches {', '.join(served)} only, not every namespace: ask for those "
            "(DISCOVERY_NAMESPACES on the sidecar), or deploy a relay with DISCOVERY_NAMESPACES=*"
        )
    missing = [n for n in wanted if n not in served]
    if missing:
        return (
            f"this relay does not watch namespace {', '.join(missing)} (it watches {', '.join(served)}); follow a "
            "relay that does, or add it to the relay's DISCOVERY_NAMESPACES"
        )
    return None
