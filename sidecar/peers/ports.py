"""Where the halves of the shell meet: the protocols between sources, the hub, registration and the API.

* ``SourceStore``: what one source of peers (a Kubernetes reflector, or the etcd watch) writes into.
  ``PeerHub.store(name)`` hands one out per source. A source never knows who reads.
* ``PeerReader``: what the pod-facing layers (gRPC, HTTP, the SMG writer) read; ``PeerHub`` implements
  it. ``subscribe`` is its one change signal: every commit that appends entries, the first sync, a
  source's health changing and the hub closing call each subscriber with a ``HubChange``.
* ``Publisher``: this pod's own registration (a Kubernetes CR, or an etcd lease).
  It raises ``RegistrationError`` subclasses with a meaning (forbidden, invalid, too large, not
  found, unavailable, blocked); the gRPC layer maps meanings to status codes and imports no client
  library.
* The values every layer shares: ``PodIdentity`` (which pod this sidecar speaks for), ``ListenAddress``
  (where a server listens) and the two modes the daemon and the publishers act on, ``WatchMode`` and
  ``RegisterMode`` (parsed once, from ``DISCOVERY_WATCH`` and ``DISCOVERY_REGISTER``).

Nothing here imports a transport, so ``sidecar.serve`` depends on these and on the pure core only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from sidecar.core.eventlog import ApiStatus, LogEntry, StatusChange
from sidecar.core.peer import Peer
from sidecar.core.records import Record


@dataclass(frozen=True)
class PodIdentity:
    """Which pod incarnation this sidecar speaks for (downward API or /etc/podinfo)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class ListenAddress:
    """Where a server listens: ``host:port`` on loopback (or any interface when allowed) or a Unix socket."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def grpc_target(self) -> str:
        if self.unix_path:
            return f"unix://{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def bind_target(self) -> str:
        """What a gRPC server listens on: ``unix:/path`` for a socket, since the server strips only ``unix:``
        and counts the rest against the path limit (``unix:///path`` would cost two of its bytes)."""
        return f"unix:{self.unix_path}" if self.unix_path else self.grpc_target

    def __str__(self) -> str:
        return self.grpc_target


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS key pair, as PEM files (a mounted Secret: re-read when they change, e.g. renewed)."""

    cert: str
    key: str


class WatchMode(StrEnum):
    """When peers are watched (``DISCOVERY_WATCH``)."""

    AUTO = "auto"  # from the first request for peers
    ALWAYS = "always"  # from start-up (routers, frontends)
    NEVER = "never"  # never: peer requests are refused


class RegisterMode(StrEnum):
    """Whether this sidecar writes the pod's registration (``DISCOVERY_REGISTER``)."""

    AUTO = "auto"  # register, unless another writer (Dynamo's runtime) manages it: then watch-only
    NEVER = "never"  # watch-only from the start


class SourceStore(Protocol):
    """The writer side of the peer directory, bound to one source (client-go's ``ReflectorStore``)."""

    def upsert(self, key: str, record: Record, received: float | None = None) -> None:
        """One object was added or changed; ``received`` is the monotonic time its event arrived."""

    def delete(self, key: str, received: float | None = None) -> None:
        """One object went away."""

    def replace(self, records: Mapping[str, Record], received: float | None = None) -> int:
        """The source's whole set after a (re)list; marks the source synced. Returns the changes it made."""
        ...

    def set_health(self, healthy: bool, reason: str = "") -> None:
        """Whether the source can reach its origin; any unhealthy source makes the stream DEGRADED."""


class PeerSetState(NamedTuple):
    """The peer set at one revision, with the API status at that revision, taken atomically."""

    revision: int
    peers: list[Peer]
    status: StatusChange


@dataclass(frozen=True)
class HubChange:
    """What one commit to the hub changed, as its subscribers are told (the hub's one change signal).

    Every consumer wakes on this: the gRPC streams, the SMG writer, the peer-change reporter. A change
    with no entries still matters to someone: the first sync (a source listed, nothing appended), a
    source's health (when the API status does not flip), the hub closing (shutdown).
    """

    entries: Sequence[LogEntry] = ()  # appended by this commit, in revision order
    synced: bool = False  # the hub is synced after this commit (every source has listed once)
    closed: bool = False  # the hub closed: no more changes will come


Subscriber = Callable[[HubChange], None]
"""Called in the writer's thread, outside the hub's lock, after each change; must not block."""


class NotWatching(Exception):
    """Peers are not watched by this sidecar (``DISCOVERY_WATCH=never``); ``str()`` names the setting."""


class PeerReader(Protocol):
    """The read side of the peer directory, as the gRPC and HTTP layers see it."""

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` after every change from now on (the one change signal; see ``HubChange``)."""
        ...

    def demand(self) -> bool:
        """A client asked for peers: start the watches if they start on demand (``DISCOVERY_WATCH=auto``).

        Returns at once, True when this call started them (the caller then waits for the sync within its
        deadline); raises ``NotWatching`` when this sidecar never watches.
        """
        ...

    @property
    def history_id(self) -> str: ...

    @property
    def self_uid(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    @property
    def synced(self) -> bool: ...

    def wait_synced(self, timeout: float | None) -> bool:
        """Block until every source has listed once (True), or the timeout or shutdown (False)."""
        ...

    def state(self) -> PeerSetState: ...

    def covers(self, history_id: str, revision: int) -> bool:
        """Whether a client at (history_id, revision) can resume from the held history."""
        ...

    def status_at(self, revision: int) -> ApiStatus | None:
        """The API status as of ``revision``, or None when that history is no longer held."""
        ...

    def wait_entries(self, after: int, timeout: float, limit: int) -> list[LogEntry] | None:
        """Entries after ``after`` (waiting up to ``timeout`` for one); None when the history is gone."""
        ...

    def source_health(self) -> dict[str, str]:
        """Unhealthy sources and why."""
        ...


@dataclass(frozen=True)
class Registration:
    """This pod's registration as last applied: what ``GetSelf`` and ``PublishMetadata`` report.

    The instance this sidecar speaks for is the publisher's to say, on every backend: its name, its
    peer key (``Peer.uid``, as peers see it) and its instance ID (Kubernetes: the SipHash of the CR's
    name; etcd: the lease, which changes when the lease is lost; 0 and "" while there is none).
    """

    registered: bool
    resource_version: str
    data: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = field(kw_only=True)
    peer_uid: str = field(kw_only=True)
    instance_id: int = field(kw_only=True)


class Publisher(Protocol):
    """This pod's own registration (a Kubernetes CR, or an etcd lease and its keys): the publisher role.

    The daemon starts it and deregisters it at shutdown, the probes read ``problems`` and ``notes``, the
    pod-facing API reads ``registration`` and calls ``publish``.
    """

    def start(self) -> threading.Thread:
        """Register, and keep registered, in a background thread; return it (liveness watches it)."""
        ...

    def deregister(self, timeout: float) -> bool:
        """Withdraw the registration (peers see this pod leave); True when confirmed within ``timeout``."""
        ...

    def registration(self) -> Registration: ...

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        """Replace (or RFC 7386 merge-patch) the pod's metadata and apply it now.

        Raises a ``RegistrationError`` subclass; on any error the previous metadata stays in force.
        """
        ...

    def problems(self) -> Sequence[str]:
        """Why the pod is not registered right now (empty: registered)."""
        ...

    def notes(self) -> Sequence[str]:
        """A healthy but unusual state, for ``/readyz``'s body (watch-only, and why)."""
        ...


class RegistrationError(Exception):
    """Registering or publishing failed; ``str()`` is a sentence for the operator (what to change)."""


class Forbidden(RegistrationError):
    """The credentials may not do this (RBAC, admission policy): retrying as is will not help."""


class Invalid(RegistrationError):
    """The metadata itself is unacceptable (schema, size, the API server's validation)."""


class TooLarge(RegistrationError):
    """The metadata exceeds a documented bound (size, depth): it will never fit as it is."""


class NotFound(RegistrationError):
    """What registration writes to does not exist (e.g. the CRD is not installed)."""


class Unavailable(RegistrationError):
    """The backing store cannot be reached or answered with a transient error: retry later."""


class Blocked(Unavailable):
    """Nothing may be written until something outside the sidecar finishes (Kubernetes: the CR of this
    pod's name is being deleted and a finalizer holds it); ``str()`` names it. Waited out, not retried
    with backoff: the publisher loop re-checks soon, and its own watch wakes it when it is over."""


class NotRegistering(RegistrationError):
    """This sidecar does not write the pod's registration (watch-only): another writer owns it, or the
    configuration says so. Publishing through it would fight that writer, so it is refused."""


# -- who may read peers through a relay ------------------------------------------------------------------
class AccessError(Exception):
    """A relay's client may not be served (now); ``str()`` is a sentence for the client's operator."""


class Unauthenticated(AccessError):
    """The client presented no token, or one the API server does not accept (expired, its pod deleted)."""


class AccessDenied(AccessError):
    """The client's identity may not list the peers of a namespace it asked for; ``str()`` names it."""


class NotServed(AccessError):
    """The client asked for a namespace this relay does not watch."""


class AccessUnavailable(AccessError):
    """The API server could not be asked (TokenReview or SubjectAccessReview failed): retry later."""


@dataclass(frozen=True)
class Grant:
    """What one client may see through a relay, until ``expires`` (``time.monotonic()``), when it must be
    checked again (an open stream is ended when the check then fails)."""

    namespaces: frozenset[str] | None  # the namespaces whose peers it may see; None: every namespace
    expires: float
    user: str = ""  # who it is, as the API server reviewed its token (for logs)


class Access(Protocol):
    """Who may read peers through a relay: authenticates a client's token and authorises each namespace
    it asks for (``sidecar.kube.access`` asks the API server). Blocking: the gRPC layer calls it in a pool."""

    def admit(self, token: str, namespaces: Sequence[str] | None) -> Grant:
        """The client's grant for ``namespaces`` (None: every namespace this relay watches); raises an
        ``AccessError`` subclass saying why not."""
        ...
