"""The watch of this pod's own registration, which runs whatever ``DISCOVERY_WATCH`` says.

A pod that never asks for its peers holds no peer watch (``DISCOVERY_WATCH=auto``), yet its registration
can be deleted, altered or taken over from under it; without a watch of its own it would learn so only
at the publisher's next resync, while every reader drops it and ``/readyz`` says 200. So every publisher
follows exactly what it wrote, and only that: on Kubernetes its CR alone (``sidecar.kube.own_registration``),
on etcd its keys and lease (``sidecar.etcd.own_keys``). Both are ``SourceLoop``s that feed no peers; each
hands what it sees to its publisher (the CR's events and relists, or each key's change), which decides
under its write lock whether it is its own write or a loss, and restores it.

What is the same for both lives here once:

* ``OwnWatch``: what the publisher and the daemon ask of such a watch. The backend's ``build`` makes it
  and returns it with the ``Backend`` (the daemon starts it with the publisher and stops it after the
  deregistration, which it confirms); the publisher holds it (``PublisherLoop.own_watch``).
* ``OwnWatchStore``: the ``SourceStore`` of a watch that keeps no peers, only whether it reaches its
  origin (False until its first list or read-back) and, for the publisher, what each relist found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from sidecar.core.records import Record

RelistObserver = Callable[[Mapping[str, Record]], None]
"""Told what a (re)list of the own registration found (a relist is not a stream of events: a registration
deleted while the watch was down shows only as missing from it)."""


class OwnWatch(Protocol):
    """The watch of this pod's own registration (its CR alone, or its keys and lease)."""

    @property
    def healthy(self) -> bool:
        """Whether it follows the registration now (listed once, and no failure since): deregistration then
        waits for its withdrawal to come back through it, else reads the registration back once."""
        ...

    def refresh(self) -> None:
        """The publisher now writes something else (other keys, a new lease): follow that from now on."""
        ...

    def start(self) -> threading.Thread: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class OwnWatchStore:
    """The ``SourceStore`` of an own-registration watch: no peers, only its health and each relist.

    Written by the watch's thread only; ``healthy`` (a plain bool) is read by the publisher from others.
    """

    def __init__(self, on_relist: RelistObserver | None = None) -> None:
        self.on_relist = on_relist
        self.healthy = False  # until the first list (or read-back) reached the origin

    def upsert(self, key: str, record: Record, received: float | None = None) -> None:
        return None  # the publisher follows each event itself (the reflector's observer, or ``check``)

    def delete(self, key: str, received: float | None = None) -> None:
        return None

    def replace(self, records: Mapping[str, Record], received: float | None = None) -> int:
        """A (re)list (or read-back) reached the origin: healthy, and the publisher told what it found."""
        self.healthy = True
        if self.on_relist is not None:
            self.on_relist(records)
        return 0

    def set_health(self, healthy: bool, reason: str = "") -> None:
        self.healthy = healthy
