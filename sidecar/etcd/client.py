"""A small, synchronous etcd v3 client over gRPC: the calls the etcd backend makes, and nothing else.

Built on ``grpcio`` (a dependency already) and stubs generated from ``sidecar/etcd/protos`` (etcd's
own field numbers), because no client on PyPI offers all of: protobuf 7, a watch from a start
revision with previous values that reports compaction, leases, transactions, TLS from PEM text and
user/password authentication over plain text as well as TLS (the comparison is in the README).

* Endpoints: the first one is dialled; a call that finds it unavailable moves to the next (reads
  retry there at once; writes do not, since a write that timed out may have been applied: the caller
  decides). gRPC keepalives notice a dead connection while a stream is open.
* Authentication: ``Authenticate`` once, the token then travels as ``token`` metadata; a call refused
  for an invalid (expired) token re-authenticates and is retried once.
* Errors: every failure is an ``EtcdError`` subclass with a meaning (unavailable, compacted, lease not
  found, permission denied, authentication failed, too large, invalid); no ``grpc`` exception leaves.
* ``WatchStream``: one ``Watch`` call carrying several watchers; it asks etcd for a progress report
  every ``progress_interval`` and cancels itself when nothing at all arrived for ``silence_timeout``
  (a connection that stays open but delivers nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.settings import Endpoint, EtcdSettings

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)

RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"
DELETE_RANGE = "/etcdserverpb.KV/DeleteRange"
TXN = "/etcdserverpb.KV/Txn"
COMPACT = "/etcdserverpb.KV/Compact"
WATCH = "/etcdserverpb.Watch/Watch"
LEASE_GRANT = "/etcdserverpb.Lease/LeaseGrant"
LEASE_REVOKE = "/etcdserverpb.Lease/LeaseRevoke"
LEASE_KEEPALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"
LEASE_TTL = "/etcdserverpb.Lease/LeaseTimeToLive"
AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Ping an open stream every 10 s, give up on it 5 s later: a vanished etcd is noticed by a watch.
    # (etcd refuses pings without an open stream, and more often than every 5 s: both are kept.)
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Reconnect within 2 s of etcd coming back (gRPC's default backoff grows to 2 minutes); the
    # callers' own jittered backoff paces the retries. Not ``grpc.min_reconnect_backoff_ms``: gRPC core
    # takes it as each connection attempt's deadline (20 s by default), and 100 ms cuts off a TLS
    # handshake with a loaded etcd.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class EtcdError(Exception):
    """A call to etcd failed; ``str()`` says what and, where it helps, what to change."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """etcd cannot be reached, or did not answer in time, or has no leader: retry later."""


class EtcdCompacted(EtcdError):
    """The revision asked for is compacted away: read the whole prefix again."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message, "compacted")
        self.compact_revision = compact_revision


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (any more): it expired or was revoked."""


class EtcdPermissionDenied(EtcdError):
    """The etcd user lacks a role granting this key range."""


class EtcdAuthFailed(EtcdError):
    """Authentication failed: wrong user or password, or credentials missing while etcd requires them."""


class EtcdTooLarge(EtcdError):
    """The request exceeds a limit of etcd (request bytes, operations per transaction)."""


class EtcdInvalid(EtcdError):
    """etcd refused the request as malformed."""


def classify(exc: grpc.RpcError, method: str) -> EtcdError:
    """The meaning of a failed call (etcd's rpctypes errors are gRPC codes plus a fixed message)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    name = method.rsplit("/", 1)[-1]
    text = f"etcd {name}: {code.name}: {details}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EtcdUnavailable(text, "unavailable")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return EtcdCompacted(text)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return EtcdLeaseNotFound(text, "lease-not-found")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return EtcdPermissionDenied(
            f"{text} (the etcd user needs a role with readwrite on the v1/ prefixes)", "permission-denied"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED or "authentication failed" in details or "user name is empty" in details:
        return EtcdAuthFailed(
            f"{text} (check ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD)", "unauthenticated"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in details or "too many operations" in details:
        return EtcdTooLarge(text, "too-large")
    if code == grpc.StatusCode.CANCELLED:
        return EtcdUnavailable(text, "cancelled")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return EtcdInvalid(text, "invalid")
    return EtcdUnavailable(text, code.name.lower())


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdClient:
    """Owns one gRPC channel at a time (to the current endpoint) and the auth token.

    Thread-safe: the source's thread, the publisher's thread and the gRPC API's threads share one.
    ``_lock`` guards ``_channel``, ``_index`` and ``_token``; no call holds it while waiting on etcd,
    except ``_authenticate``, which is rare and short (it holds ``_auth_lock``, not ``_lock``).
    """

    def __init__(self, settings: EtcdSettings, request_timeout: float = 15.0) -> None:
        if not settings.endpoints:
            raise ValueError("no etcd endpoints")
        self.settings = settings
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._index = 0
        self._channel: grpc.Channel | None = None
        self._token: str | None = None
        self._closed = False

    # -- connection ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> Endpoint:
        with self._lock:
            return self.settings.endpoints[self._index]

    def _current(self) -> tuple[grpc.Channel, str | None]:
        with self._lock:
            if self._closed:
                raise EtcdUnavailable("the etcd client is closed", "closed")
            if self._channel is None:
                self._channel = self._dial(self.settings.endpoints[self._index])
            return self._channel, self._token

    def _dial(self, endpoint: Endpoint) -> grpc.Channel:
        if endpoint.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.settings.ca_pem,
                private_key=self.settings.client_key_pem,
                certificate_chain=self.settings.client_cert_pem,
            )
            return grpc.secure_channel(endpoint.target, credentials, options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(endpoint.target, options=CHANNEL_OPTIONS)

    def rotate(self, failed: grpc.Channel | None = None) -> None:
        """Move to the next endpoint (when ``failed`` is still the current channel)."""
        with self._lock:
            if len(self.settings.endpoints) == 1 or (failed is not None and failed is not self._channel):
                return
            old, self._channel = self._channel, None
            self._index = (self._index + 1) % len(self.settings.endpoints)
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _metadata(self, token: str | None) -> tuple[tuple[str, str], ...] | None:
        return (("token", token),) if token else None

    def _authenticate(self, stale: str | None) -> None:
        """Get a token (again) unless another thread already replaced ``stale``."""
        if self.settings.username is None:
            return
        with self._auth_lock:
            with self._lock:
                if self._token is not None and self._token != stale:
                    return
            channel, _ = self._current()
            request = pb.AuthenticateRequest(name=self.settings.username, password=self.settings.password or "")
            try:
                reply = channel.unary_unary(
                    AUTHENTICATE,
                    request_serializer=pb.AuthenticateRequest.SerializeToString,
                    response_deserializer=pb.AuthenticateResponse.FromString,
                )(request, timeout=self.request_timeout)
            except grpc.RpcError as exc:
                error = classify(exc, AUTHENTICATE)
                if isinstance(error, EtcdInvalid) and "authentication is not enabled" in str(error):
                    return  # etcd runs without auth: no token is needed (nor accepted)
                if isinstance(error, EtcdInvalid):
                    error = EtcdAuthFailed(f"{error} (check ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD)", "unauthenticated")
                raise error from exc
            with self._lock:
                self._token = reply.token or None

    # -- calls --------------------------------------------------------------------------------------
    def _unary(self, method: str, request: _Req, response: type[_Resp], *, idempotent: bool) -> _Resp:
        attempts = len(self.settings.endpoints) if idempotent else 1
        reauthenticated = False
        if self.settings.username is not None and self._token is None:
            self._authenticate(None)
        attempt = 0
        while True:
            channel, token = self._current()
            call = channel.unary_unary(method, request_serializer=_serialize, response_deserializer=response.FromString)
            try:
                return call(request, timeout=self.request_timeout, metadata=self._metadata(token))
            except grpc.RpcError as exc:
                error = classify(exc, method)
                if isinstance(error, EtcdAuthFailed) and self.settings.username and not reauthenticated:
                    reauthenticated = True
                    self._authenticate(token)
                    continue
                if isinstance(error, EtcdUnavailable):
                    self.rotate(channel)
                    attempt += 1
                    if attempt < attempts:
                        continue
                raise error from exc

    def range(
        self, key: bytes, range_end: bytes = b"", *, revision: int = 0, limit: int = 0
    ) -> pb.RangeResponse:
        request = pb.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit)
        return self._unary(RANGE, request, pb.RangeResponse, idempotent=True)

    def range_prefix(self, prefix: bytes, *, revision: int = 0, page_size: int = 500) -> tuple[int, list[pb.KeyValue]]:
        """Every key under ``prefix`` at one revision (``revision``, or now): (that revision, the pairs).

        Paginated: each page is read at the revision of the first, so the result is one consistent
        snapshot however large. Raises ``EtcdCompacted`` when ``revision`` is compacted away.
        """
        end = prefix_end(prefix)
        start = prefix
        kvs: list[pb.KeyValue] = []
        while True:
            reply = self.range(start, end, revision=revision, limit=page_size)
            if not revision:
                revision = reply.header.revision
            kvs.extend(reply.kvs)
            if not reply.more or not reply.kvs:
                return revision, kvs
            start = reply.kvs[-1].key + b"\0"

    def put(self, key: bytes, value: bytes, lease: int = 0) -> pb.PutResponse:
        return self._unary(PUT, pb.PutRequest(key=key, value=value, lease=lease), pb.PutResponse, idempotent=False)

    def delete(self, key: bytes, range_end: bytes = b"") -> pb.DeleteRangeResponse:
        request = pb.DeleteRangeRequest(key=key, range_end=range_end)
        return self._unary(DELETE_RANGE, request, pb.DeleteRangeResponse, idempotent=False)

    def txn(self, request: pb.TxnRequest) -> pb.TxnResponse:
        return self._unary(TXN, request, pb.TxnResponse, idempotent=False)

    def compact(self, revision: int, physical: bool = True) -> pb.CompactionResponse:
        request = pb.CompactionRequest(revision=revision, physical=physical)
        return self._unary(COMPACT, request, pb.CompactionResponse, idempotent=False)

    def lease_grant(self, ttl: int) -> pb.LeaseGrantResponse:
        reply = self._unary(LEASE_GRANT, pb.LeaseGrantRequest(TTL=ttl), pb.LeaseGrantResponse, idempotent=False)
        if reply.error:
            raise EtcdInvalid(f"etcd LeaseGrant: {reply.error}", "invalid")
        return reply

    def lease_revoke(self, lease: int) -> pb.LeaseRevokeResponse:
        return self._unary(LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease), pb.LeaseRevokeResponse, idempotent=True)

    def lease_time_to_live(self, lease: int, keys: bool = False) -> pb.LeaseTimeToLiveResponse:
        request = pb.LeaseTimeToLiveRequest(ID=lease, keys=keys)
        return self._unary(LEASE_TTL, request, pb.LeaseTimeToLiveResponse, idempotent=True)

    def lease_keep_alive_once(self, lease: int, timeout: float | None = None) -> int:
        """Renew ``lease`` once; return the TTL etcd granted (0 or less: the lease is gone).

        One short ``LeaseKeepAlive`` stream per renewal, with a deadline: a frozen connection fails
        the renewal instead of blocking it, and there is no long-lived stream to supervise.
        """
        reauthenticated = False
        while True:
            channel, token = self._current()
            call = channel.stream_stream(
                LEASE_KEEPALIVE,
                request_serializer=_serialize,
                response_deserializer=pb.LeaseKeepAliveResponse.FromString,
            )(
                iter([pb.LeaseKeepAliveRequest(ID=lease)]),
                timeout=timeout if timeout is not None else self.request_timeout,
                metadata=self._metadata(token),
            )
            try:
                for reply in call:
                    return int(reply.TTL)
                return 0  # the stream ended without an answer: etcd closed it; the lease is unknown to it
            except grpc.RpcError as exc:
                error = classify(exc, LEASE_KEEPALIVE)
                if isinstance(error, EtcdAuthFailed) and self.settings.username and not reauthenticated:
                    reauthenticated = True
                    self._authenticate(token)
                    continue
                if isinstance(error, EtcdUnavailable):
                    self.rotate(channel)
                raise error from exc
            finally:
                call.cancel()

    def watch(
        self,
        creates: Sequence[pb.WatchCreateRequest],
        *,
        progress_interval: float = 5.0,
        silence_timeout: float = 30.0,
    ) -> WatchStream:
        if self.settings.username is not None and self._token is None:
            self._authenticate(None)
        channel, token = self._current()
        return WatchStream(self, channel, token, creates, progress_interval, silence_timeout)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class WatchStream:
    """One ``Watch`` call with several watchers: iterate it for ``WatchResponse``s; ``close`` from anywhere.

    Iteration ends with ``EtcdUnavailable`` when the connection fails, when the stream was silent for
    ``silence_timeout`` (code ``silent``), or when ``close`` was called (code ``closed``).
    """

    def __init__(
        self,
        client: EtcdClient,
        channel: grpc.Channel,
        token: str | None,
        creates: Sequence[pb.WatchCreateRequest],
        progress_interval: float,
        silence_timeout: float,
    ) -> None:
        self._client = client
        self._channel = channel
        self._token = token
        self._creates = list(creates)
        self._progress_interval = progress_interval
        self._silence_timeout = silence_timeout
        self._closed = threading.Event()
        self._silent = False
        self._last_received = time.monotonic()
        self._call = channel.stream_stream(
            WATCH, request_serializer=_serialize, response_deserializer=pb.WatchResponse.FromString
        )(self._requests(), metadata=client._metadata(token))

    def _requests(self) -> Iterator[pb.WatchRequest]:
        for create in self._creates:
            yield pb.WatchRequest(create_request=create)
        while not self._closed.wait(self._progress_interval):
            if time.monotonic() - self._last_received > self._silence_timeout:
                self._silent = True
                self._call.cancel()
                return
            yield pb.WatchRequest(progress_request=pb.WatchProgressRequest())

    def __iter__(self) -> Iterator[pb.WatchResponse]:
        try:
            for response in self._call:
                self._last_received = time.monotonic()
                yield response
        except grpc.RpcError as exc:
            if self._closed.is_set():
                raise EtcdUnavailable("the watch was closed", "closed") from exc
            if self._silent:
                raise EtcdUnavailable(
                    f"the watch delivered nothing, not even a progress report, for {self._silence_timeout:.0f}s",
                    "silent",
                ) from exc
            error = classify(exc, WATCH)
            if isinstance(error, EtcdUnavailable):
                self._client.rotate(self._channel)
            raise error from exc
        finally:
            self._closed.set()
            self._call.cancel()
        raise EtcdUnavailable("etcd ended the watch", "ended")

    def close(self) -> None:
        self._closed.set()
        self._call.cancel()
