"""This process's registration in etcd, as Dynamo's runtime makes it: a lease, keys on it, keep-alives.

The etcd twin of ``sidecar.kube.publisher``, and a ``Publisher`` to the pod-facing API.

* Register: grant a lease of ``ETCD_LEASE_TTL`` seconds; its ID **is** the instance ID (Dynamo's
  ``connection_id``). Write every entry of the metadata (``spec.data``-shaped: ``endpoints``,
  ``model_cards``, ``event_channels``, ``event_sources``) under Dynamo's keys (``sidecar.etcd.keys``),
  all attached to the lease, each new key created by a transaction "if ``version == 0``" as Dynamo's
  ``kv_create`` does. Endpoint and model entries get the lease ID as ``instance_id`` (in the key and in
  the value); event channels and sources keep their own publisher IDs.
* Keep alive: renew the lease every TTL/2. After a whole TTL without a successful renewal (etcd
  unreachable) the lease is *presumed* lost: ``problems()`` says so (readiness fails), renewals go on.
  The lease is *lost* when etcd answers a renewal with a TTL of 0 or less (it expired or was revoked):
  then the loop registers again with backoff: a **new lease, hence a new instance ID**. That is what
  Dynamo clients expect: to them an instance is its lease; the old instance's keys went with its
  lease (a removal) and the new one's keys appear (an addition), exactly as if the worker had
  restarted. If etcd still has the lease (it extends leases across its own restart), the instance
  simply stays registered under its ID.
* Publish: replace or merge-patch the metadata, then write only the difference: changed and new keys
  are put (new ones created "if ``version == 0``"), keys no longer in the metadata are deleted, in
  transactions of at most ``MAX_TXN_KEYS`` keys (etcd refuses more than 128 operations per
  transaction). On any failure the previous metadata stays in force.
* Follow its own keys (``sidecar.etcd.own_keys``, whatever ``DISCOVERY_WATCH`` says): a key deleted or
  overwritten by someone else is written again at once, under the same lease; all keys deleted because
  the lease was revoked are noticed at once too (not at the next renewal), and a new lease is registered.
  What happens is said by the loop's ``health``, as for the Kubernetes CR.
* Deregister (SIGTERM): revoke the lease; etcd deletes every key in one revision, so watchers see the
  instance leave at once.

The thread, the state (``sidecar.peers.publisher_loop.PublisherState``), backoff, the failure rule, the
health reports and the one publish path are the ``PublisherLoop``'s; the lease, its keys, their writing
and their repair are this module's. Its
``_apply_lock`` serialises everything that writes (registration, publish, loss handling); its
``_state_lock`` guards the fields readers look at and is never held during a call to etcd.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from sidecar.core.dynamo_keys import DocumentError, registration_keys
from sidecar.core.instance_join import instance_peer_key
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import (
    EtcdAuthFailed,
    EtcdClient,
    EtcdError,
    EtcdInvalid,
    EtcdLeaseNotFound,
    EtcdPermissionDenied,
    EtcdTooLarge,
    EtcdUnavailable,
)
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    Forbidden,
    Invalid,
    RegisterMode,
    Registration,
    RegistrationError,
    TooLarge,
    Unavailable,
)
from sidecar.peers.publisher_loop import RESYNC_SECONDS, PublisherLoop, PublisherState
from sidecar.peers.registration_health import HealthListener

MAX_TXN_KEYS = 64
RENEWAL_RETRY = 0.5  # seconds between renewals while they fail (within the TTL)


class KeyConflict(EtcdError):
    """A key this instance must create is held by another lease."""


def _absent(key: str) -> pb.Compare:
    """The comparison "the key does not exist" (its version is 0), Dynamo's create-if-absent guard."""
    return pb.Compare(key=key.encode(), target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)


def registration_error(exc: Exception, action: str, reach: str = "") -> RegistrationError:
    """The meaning of a failed etcd call (an ``EtcdError``), with an operator's sentence; the etcd twin of
    ``sidecar.kube.publisher.registration_error``, with the same contract.

    ``reach``: what the sentence says could not be done when etcd is unreachable (``action``)."""
    if isinstance(exc, EtcdPermissionDenied):
        return Forbidden(
            f"etcd refused to {action}: {exc}; grant the etcd user (ETCD_AUTH_USERNAME) a role with readwrite on "
            "v1/instances/, v1/mdc/, v1/event_channels/ and v1/event_sources/"
        )
    if isinstance(exc, EtcdAuthFailed):
        return Forbidden(f"etcd rejected the credentials trying to {action}: {exc}")
    if isinstance(exc, EtcdTooLarge):
        return TooLarge(f"etcd refused to {action}: {exc} (etcd's --max-request-bytes and --max-txn-ops bound it)")
    if isinstance(exc, (EtcdInvalid, KeyConflict)):
        return Invalid(f"cannot {action}: {exc}")
    if isinstance(exc, EtcdLeaseNotFound):
        return Unavailable(f"cannot {action}: this instance's lease expired; it is registering again with a new one")
    return Unavailable(f"cannot reach etcd to {reach or action}: {exc}")


class EtcdPublisher(PublisherLoop):
    """Owns this instance's lease and what is written under it; the loop that keeps it alive, the state
    and the desired metadata are the ``PublisherLoop``'s. The etcd backend builds it and the daemon starts
    and deregisters it; the gRPC layer calls ``registration``, ``publish`` and ``problems`` from its
    threads; the own-keys watch (``sidecar.etcd.own_keys``) calls ``written_snapshot`` and ``check``.
    ``_state_lock`` (the loop's) also guards ``_lease``, ``_granted_ttl``, ``_last_renewed``, ``_written``,
    ``_revision``, ``_lost_lease``, ``_loss`` and ``_repair``."""

    thread_name = "etcd-publisher"
    noun = "this instance"
    unregistered = "not registered in etcd"

    def __init__(
        self,
        client: EtcdClient,
        initial_data: Mapping[str, Any],
        *,
        lease_ttl: int,
        metrics: Metrics | None = None,
        backoff_max: float = 30.0,
        labels: Mapping[str, str] | None = None,
        on_registered: Callable[[int], None] | None = None,
        register: str = RegisterMode.AUTO,
        name: str = "",
        resync: float = RESYNC_SECONDS,
        health_listener: HealthListener | None = None,
    ) -> None:
        super().__init__(
            initial_data,
            metrics=metrics,
            backoff_max=backoff_max,
            register=register,
            log=structlog.get_logger("sidecar.etcd.publisher"),
            watch_only_reason="watch-only: DISCOVERY_REGISTER=never, so this sidecar holds no lease and writes "
            "nothing in etcd; publish through whatever registers this instance in etcd",
            resync=resync,
            health_listener=health_listener,
        )
        self.client = client
        self.on_registered = on_registered  # called with each new lease once its keys are written
        self.name = name  # what GetSelf calls this instance (the pod's name)
        self.lease_ttl = lease_ttl
        self.labels = dict(labels or {})
        self._lease = 0  # the current lease (0: none)
        self._granted_ttl = lease_ttl
        self._last_renewed = 0.0  # monotonic time a renewal (or the grant) last succeeded
        self._written: dict[str, bytes | None] = {}  # key -> value under the current lease (None: unknown)
        self._revision = 0  # etcd revision of the last write
        self._lost_lease = 0  # a lease given up on, to revoke before registering again
        self._loss = ""  # why the last lease was lost, until registered again
        self._repair = False  # the own-keys watch saw a key of this lease deleted or overwritten
        self.leases_granted = 0

    # -- what the API reads ---------------------------------------------------------------------------
    @property
    def instance_id(self) -> int | None:
        """The current lease ID (Dynamo's instance ID on this backend); None while there is no lease."""
        with self._state_lock:
            return self._lease or None

    def registration(self) -> Registration:
        with self._state_lock:
            return Registration(
                registered=self.registered.is_set(),
                resource_version=str(self._revision) if self._revision else "",
                data=copy.deepcopy(self._data),
                labels=dict(self.labels),
                name=self.name,
                peer_uid=instance_peer_key(self._lease) if self._lease else "",
                instance_id=self._lease,
            )

    def written_keys(self) -> dict[str, bytes | None]:
        with self._state_lock:
            return dict(self._written)

    # -- the own-keys watch (``sidecar.etcd.own_keys.OwnKeys``) -----------------------------------------------
    def written_snapshot(self) -> tuple[int, dict[str, bytes | None]]:
        with self._state_lock:
            if self._state is PublisherState.DEREGISTERING:
                return 0, {}
            return self._lease, dict(self._written)

    def check(self, lease: int, key: str, value: bytes | None, key_lease: int) -> None:
        """The own-keys watch saw ``key`` change: unless it is this publisher's own write, restore it now.

        Taken under the write lock, so a write under way finishes first and ``_written`` says what it wrote
        (the watch may deliver an own write's event before the write's answer arrives).
        """
        with self._apply_lock, self._state_lock:
            if self._state is PublisherState.DEREGISTERING or lease != self._lease or key not in self._written:
                return  # not this lease's any more, or no longer a key of the metadata
            expected = self._written[key]
            if value is not None and key_lease == lease and (expected is None or value == expected):
                return  # this publisher's own write
            self._written[key] = None  # not as written: write it again
            self._repair = True
        if value is None:
            self.health.lost("keys_deleted", f"{key} was deleted", lease=f"{lease:x}")
        else:
            holder = f"lease {key_lease:x}" if key_lease else "no lease"
            self.health.lost("keys_altered", f"{key} was overwritten (now on {holder})", lease=f"{lease:x}")
        self._wake.set()

    # -- publish (the PublisherLoop's hooks) ----------------------------------------------------------------
    def _refusal(self, previous: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
        with self._state_lock:
            lease = self._lease
        try:
            registration_keys(new, lease or 1)
        except DocumentError as exc:
            return f"the metadata cannot be registered in etcd: {exc}"
        return None

    def _write(self, data: Mapping[str, Any]) -> Registration:
        with self._state_lock:
            lease = self._lease
            why = self._error
        if not lease:
            raise Unavailable(
                "not registered in etcd yet" + (f" ({why})" if why else "") + "; publish again once registered"
            )
        before = set(self.written_keys())
        try:
            self._write_keys(data, lease)
        except EtcdError as exc:
            self._count_error("publish", exc)
            if isinstance(exc, EtcdLeaseNotFound):
                self._wake.set()
            raise registration_error(exc, "publish metadata") from exc
        if set(self.written_keys()) != before:
            self._registration_changed()  # other keys: the own watch follows those now
        return self.registration()

    # -- writing --------------------------------------------------------------------------------------
    def _write_keys(self, document: Mapping[str, Any], lease: int) -> None:
        """Make the keys under ``lease`` exactly ``document``'s. Raises ``EtcdError``, ``KeyConflict``."""
        try:
            desired = registration_keys(document, lease)
        except DocumentError as exc:
            raise EtcdInvalid(str(exc), "invalid") from exc
        with self._state_lock:
            written = dict(self._written)
        puts = [(k, v) for k, v in desired.items() if written.get(k, b"\0absent") != v]
        deletes = [k for k in written if k not in desired]
        ops: list[tuple[str, bytes | None]] = [*puts, *((k, None) for k in deletes)]
        for start in range(0, len(ops), MAX_TXN_KEYS):
            self._write_batch(ops[start : start + MAX_TXN_KEYS], lease, written)

    def _write_batch(
        self, batch: Sequence[tuple[str, bytes | None]], lease: int, written: dict[str, bytes | None]
    ) -> None:
        for attempt in range(2):
            new = [k for k, v in batch if v is not None and k not in written]
            request = pb.TxnRequest(
                compare=[_absent(k) for k in new],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=k.encode(), value=v, lease=lease))
                    if v is not None
                    else pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k.encode()))
                    for k, v in batch
                ],
                failure=[pb.RequestOp(request_range=pb.RangeRequest(key=k.encode())) for k in new],
            )
            reply = self.client.txn(request)
            if reply.succeeded:
                for k, v in batch:
                    if v is None:
                        written.pop(k, None)
                    else:
                        written[k] = v
                with self._state_lock:
                    if self._lease == lease:
                        self._written = dict(written)
                    self._revision = reply.header.revision
                return
            held = {}
            for op in reply.responses:
                for kv in op.response_range.kvs:
                    held[kv.key.decode()] = kv.lease
            ours = [k for k, holder in held.items() if holder == lease]
            theirs = {k: holder for k, holder in held.items() if holder != lease}
            if theirs:
                key, holder = next(iter(theirs.items()))
                owner = f"instance {holder:x}" if holder else "a key without a lease"
                raise KeyConflict(f"{key} is already registered by {owner}", "conflict")
            if attempt == 0 and ours:
                for k in ours:  # an earlier write of ours landed although its answer was lost
                    written[k] = None
                continue
        raise EtcdUnavailable("the registration transaction kept failing its create-if-absent check", "conflict")

    # -- the loop (the PublisherLoop's hooks) -------------------------------------------------------------------
    def _establish(self) -> None:
        try:
            self._register()
        except EtcdError as exc:
            self._count_error("register", exc)
            raise registration_error(exc, "register this instance") from exc

    def _hold(self) -> None:
        self._keep_alive()

    def _failed(self, message: str, needs_human: bool) -> None:
        """The loop's rule, with the lost lease named first in ``problems()`` until registered again."""
        with self._state_lock:
            loss = self._loss
        super()._failed(f"{loss}; {message}" if loss else message, needs_human)

    def _register(self) -> None:
        with self._apply_lock:
            self._check_writes()
            with self._state_lock:
                lease, lost = self._lease, self._lost_lease
                data = copy.deepcopy(self._data)
            if lease:
                return
            if lost:
                try:
                    self.client.lease_revoke(lost)
                    self.log.info("revoked the lease given up on", lease=f"{lost:x}")
                except EtcdLeaseNotFound:
                    pass
                with self._state_lock:
                    self._lost_lease = 0
            grant = self.client.lease_grant(self.lease_ttl)
            lease = int(grant.ID)
            with self._state_lock:
                self._lease = lease
                self._granted_ttl = int(grant.TTL) or self.lease_ttl
                self._last_renewed = time.monotonic()
                self._written = {}
            self.leases_granted += 1
            try:
                self._write_keys(data, lease)
            except BaseException:
                with self._state_lock:
                    self._lease = 0
                    self._written = {}
                with contextlib.suppress(EtcdError):  # else it expires by itself
                    self.client.lease_revoke(lease)
                raise
            with self._state_lock:
                self._loss = ""
                self._repair = False
            if self.on_registered is not None:
                self.on_registered(lease)
            self.log.info(
                "registered in etcd", instance_id=lease, instance_id_hex=f"{lease:x}", ttl=self._granted_ttl
            )
            self._mark_registered(lease=f"{lease:x}")
        self._registration_changed()  # a new lease and its keys: the own watch follows those now

    def _keep_alive(self) -> None:
        """Renew the lease every TTL/2 until it is lost (then return) or the publisher stops.

        A whole TTL without a successful renewal makes the lease *presumed* lost: readiness fails and
        says so, but the lease is not given up. Only etcd can tell: if it still has the lease (etcd
        extends every lease when it restarts or elects a new leader, which is why Dynamo's workers
        keep theirs across an etcd restart), the next renewal succeeds and the instance keeps its ID;
        if the lease expired (a partition longer than the TTL), etcd answers with TTL 0 and a new lease
        is registered.
        """
        with self._state_lock:
            lease, ttl = self._lease, self._granted_ttl
        interval = max(ttl / 2, 0.1)
        wait = interval
        failing = False
        overdue = False
        while not self._stop.is_set():
            if self._wake.wait(wait):
                self._wake.clear()
            if self._stop.is_set():
                return
            with self._state_lock:
                if self._lease != lease:
                    return  # lost while publishing
                remaining = self._last_renewed + ttl - time.monotonic()
                repair = self._repair
            if repair:
                restored = self._restore(lease)
                if restored is False:
                    return  # the lease is gone: register again
                if restored is None:
                    wait = min(RENEWAL_RETRY, interval)
                    continue
            if remaining <= 0 and not overdue:
                overdue = True
                self._mark_unregistered(
                    f"lease {lease:x} presumed lost: no renewal succeeded for {ttl}s (its TTL), etcd unreachable; "
                    "it is kept if etcd still has it, else replaced by a new lease (a new instance ID)"
                )
                self.log.warning("etcd lease presumed lost: no renewal within its TTL", lease=f"{lease:x}", ttl=ttl)
            started = time.monotonic()
            timeout = self.client.request_timeout if overdue else min(self.client.request_timeout, remaining)
            try:
                granted = self.client.lease_keep_alive_once(lease, timeout=timeout)
            except EtcdLeaseNotFound:
                granted = 0
            except EtcdError as exc:
                self._count_error("keepalive", exc)
                self.health.failed(f"lease {lease:x} renewal failed: {exc}", needs_human=False)
                failing = True
                wait = min(RENEWAL_RETRY, interval)
                continue
            if granted <= 0:
                self._lose(lease, "etcd says the lease expired or was revoked")
                return
            if overdue:
                overdue = False
                self._mark_registered(lease=f"{lease:x}")  # tells health first: the outage is over
                self.log.info("etcd still had the lease: registered under the same instance ID", lease=f"{lease:x}")
            elif failing:
                self.health.in_place(lease=f"{lease:x}")  # renewals work again (registered all along)
            failing = False
            wait = interval
            with self._state_lock:
                self._last_renewed = started

    def _restore(self, lease: int) -> bool | None:
        """Write again the keys the own-keys watch saw deleted or overwritten, if the lease still lives.

        True once they are written; False when the lease is gone (revoked or expired: its keys went with it,
        and a new lease must be registered); None when it could not be done now (retried shortly).
        """
        try:
            ttl = int(self.client.lease_time_to_live(lease).TTL)
        except EtcdLeaseNotFound:
            ttl = -1
        except EtcdError as exc:
            self._count_error("restore", exc)
            self.health.failed(str(registration_error(exc, "restore this instance's keys")), needs_human=False)
            return None
        if ttl <= 0:
            self._lose(lease, "the lease was revoked (every key of the instance went with it)")
            return False
        with self._apply_lock:
            with self._state_lock:
                if self._lease != lease or self._state is PublisherState.DEREGISTERING:
                    return False
                data = copy.deepcopy(self._data)
                self._repair = False
            try:
                self._write_keys(data, lease)
            except EtcdError as exc:
                with self._state_lock:
                    self._repair = True
                self._count_error("restore", exc)
                error = registration_error(exc, "restore this instance's keys")
                self.health.failed(str(error), needs_human=not isinstance(error, Unavailable))
                return None
        self.health.in_place(lease=f"{lease:x}")
        return True

    def _lose(self, lease: int, why: str) -> None:
        with self._apply_lock:
            with self._state_lock:
                if self._lease != lease:
                    return
                self._lease = 0
                self._written = {}
                self._lost_lease = lease
                self._repair = False
            message = f"lease {lease:x} lost: {why}; registering again with a new lease (a new instance ID)"
            with self._state_lock:
                self._loss = message
            self._mark_unregistered(message)
            self.health.lost("lease_lost", message, lease=f"{lease:x}")
            self.log.info("etcd lease lost", lease=f"{lease:x}", reason=why)
        self._registration_changed()  # no lease, no keys: the own watch waits for the next ones

    def _count_error(self, operation: str, exc: EtcdError) -> None:
        if self.metrics is not None:
            self.metrics.api_errors.labels(f"etcd-{operation}", exc.code or "error").inc()

    # -- shutdown -------------------------------------------------------------------------------------
    def _withdraw(self, timeout: float) -> bool:
        """Revoke the lease: etcd deletes every key of this instance at once. True when it is gone."""
        with self._apply_lock:
            with self._state_lock:
                lease, self._lease = self._lease, 0
                self._written = {}
            self._mark_unregistered()
            if not lease:
                return True
            try:
                self.client.lease_revoke(lease)
            except EtcdLeaseNotFound:
                pass
            except EtcdError as exc:
                # The lease expires by itself within its TTL, taking the keys with it.
                self.log.warning("deregistration failed: cannot revoke the lease", lease=f"{lease:x}", error=str(exc))
                return False
        self.log.info("deregistered from etcd: lease revoked", lease=f"{lease:x}")
        return True
