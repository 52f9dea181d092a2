"""What a backend's ``build`` returns, and what it is built from: the daemon runs any backend through this.

A backend (``sidecar.kube``, ``sidecar.etcd``) reads its own settings and builds a ``Backend``: the hub
(with the join its records need), the sources that feed it, this pod's publisher and the watch of its
own registration, and how to close its transport. The daemon starts, probes and stops those parts in
the same order for every backend and never learns which one it runs; ``sidecar.app.backends`` is the
one place that chooses.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.core.directory import PeerDirectory
from sidecar.core.join import Join
from sidecar.core.smg_manifest import SmgManifestSettings
from sidecar.peers.hub import PeerHub
from sidecar.peers.ports import Access, PodIdentity, Publisher, RegisterMode


@dataclass(frozen=True)
class Upstream:
    """The relay tier a sidecar follows (``DISCOVERY_UPSTREAM``) and the CA that verifies it.

    ``targets``: ``(host, port)`` pairs, tried in turn; a host that is a DNS name is resolved at every
    connection, and each of its addresses is a replica (a headless Service's name gives them all). The
    certificate is verified against ``host`` whatever address is dialled.
    """

    targets: tuple[tuple[str, int], ...]
    ca_file: str


class SharedSettings(Protocol):
    """The common settings a backend builds from (``sidecar.app.config.Settings`` is one)."""

    @property
    def identity(self) -> PodIdentity: ...

    @property
    def pod_labels(self) -> Mapping[str, str]: ...

    @property
    def initial_metadata(self) -> Mapping[str, Any]: ...

    @property
    def register(self) -> RegisterMode: ...

    @property
    def backoff_max(self) -> float: ...

    @property
    def registration_resync(self) -> float:
        """Seconds between read-backs of this pod's registration without an event (its own watch restores it
        at once)."""
        ...

    @property
    def request_timeout(self) -> float: ...

    @property
    def watch_silence_timeout(self) -> float: ...

    @property
    def history_size(self) -> int: ...

    @property
    def history_bytes(self) -> int: ...

    @property
    def upstream(self) -> Upstream | None:
        """The relay to follow instead of watching the API server (None: watch it)."""
        ...


class BackendSettings(Protocol):
    """What the app reads of a backend's own settings record, whichever backend it is."""

    @property
    def smg_manifest(self) -> SmgManifestSettings | None:
        """SGLang Model Gateway's manifest, where this backend's peers have workers to list (else None)."""
        ...


class Source(Protocol):
    """A source's shell (a ``SourceLoop``: a Kubernetes reflector, the etcd watch)."""

    def start(self) -> threading.Thread: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class StartupError(Exception):
    """The sidecar cannot start (e.g. etcd unreachable for the whole start-up timeout); ``str()`` says why."""


def new_hub(
    settings: SharedSettings, sources: Collection[str], join: Join, self_uid: str = ""
) -> PeerHub:
    """A hub over a fresh directory of ``sources`` (a new history ID: clients of an earlier process resync)."""
    directory = PeerDirectory(
        history_id=uuid.uuid4().hex,
        history_capacity=settings.history_size,
        history_bytes=settings.history_bytes,
        sources=sources,
        join=join,
    )
    return PeerHub(directory, self_uid=self_uid)


def _reachable(stop: threading.Event) -> bool:
    return True


@dataclass
class Backend:
    """One built backend: its hub, the sources that feed it, this pod's publisher and the watch of its own
    registration, its transport.

    The daemon owns it from ``build`` on: it starts the publisher and its own watches at once, the sources
    when peers are wanted (``DISCOVERY_WATCH``), and at shutdown deregisters first (the own watch confirms
    it), then stops the watches and closes the transport.
    """

    name: str
    hub: PeerHub
    publisher: Publisher
    sources: Sequence[Source]
    # What each source and own watch watches, for people (the "started" log line).
    descriptions: Sequence[str]
    close: Callable[[], None]
    # The watches of this pod's own registration (``sidecar.peers.own_watch``), run whatever DISCOVERY_WATCH
    # says: they feed the publisher, not the hub (none when the publisher writes nothing: watch-only on etcd).
    own_watches: Sequence[Source] = ()
    # Blocks until the backend's store can be reached at start-up (True), or ``stop`` is set (False);
    # raises ``StartupError`` when it never will (etcd: Dynamo's ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS).
    wait_reachable: Callable[[threading.Event], bool] = field(default=_reachable)


@dataclass
class RelayBackend:
    """What a relay runs (``discovery-sidecar relay``): the watches and the hub they feed, as a sidecar's,
    and who may read them (``access``); no publisher, nothing registered."""

    hub: PeerHub
    sources: Sequence[Source]
    descriptions: Sequence[str]
    access: Access
    close: Callable[[], None]
