"""Where the halves of the shell meet: the protocols between sources, the hub, registration and the API.

* ``SourceStore``: what one source of peers (a Kubernetes reflector, or the etcd watch) writes into.
  ``PeerHub.store(name)`` hands one out per source. A source never knows who reads.
* ``PeerReader``: what the pod-facing layers (gRPC, HTTP) read; ``PeerHub`` implements it.
* ``MetadataPublisher``: this pod's own registration (a Kubernetes CR, or an etcd lease).
  It raises ``RegistrationError`` subclasses with a meaning (forbidden, invalid, too large,
  not found, unavailable); the gRPC layer maps meanings to status codes and imports no client library.

Nothing here imports a transport, so ``sidecar.serve.grpc_service`` and ``sidecar.serve.http_server`` depend on
these and on the pure core only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from sidecar.core.eventlog import ApiStatus, LogEntry, StatusChange
from sidecar.core.peer import Peer
from sidecar.core.records import Record


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


class NotWatching(Exception):
    """Peers are not watched by this sidecar (``DISCOVERY_WATCH=never``); ``str()`` names the setting."""


class PeerReader(Protocol):
    """The read side of the peer directory, as the gRPC and HTTP layers see it."""

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
    """This pod's registration as last applied: what ``GetSelf`` and ``PublishMetadata`` report."""

    registered: bool
    resource_version: str
    data: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    # The instance ID peers know this pod by, when the publisher decides it: on etcd the lease ID (0
    # while there is none). None: derived from the pod name (the Kubernetes backend's hash).
    instance_id: int | None = None
    peer_uid: str | None = None  # with instance_id: this pod's Peer.uid (etcd: "etcd/{lease:x}", "" without one)


class MetadataPublisher(Protocol):
    """This pod's own registration, for the pod-facing API."""

    def registration(self) -> Registration: ...

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        """Replace (or RFC 7386 merge-patch) the pod's metadata and apply it now.

        Raises a ``RegistrationError`` subclass; on any error the previous metadata stays in force.
        """
        ...

    def problems(self) -> Sequence[str]:
        """Why the pod is not registered right now (empty: registered)."""
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


class NotRegistering(RegistrationError):
    """This sidecar does not write the pod's registration (watch-only): another writer owns it, or the
    configuration says so. Publishing through it would fight that writer, so it is refused."""
