"""A scripted stand-in for ``sidecar.etcd.client.EtcdClient``: the etcd twin of ``tests.unit.fake_api``.

``ScriptedEtcd`` is one small in-memory etcd for the publisher's and the source's tests alike:

* keys (``kv``: key -> ``pb.KeyValue``, with its lease and version) and leases, written by ``txn``
  (create-if-absent compares, puts and deletes, in one step, under one revision) and ``lease_revoke``
  (which deletes the lease's keys, as etcd does); every txn is recorded in ``txns``;
* ``range_prefix`` answers from ``kv`` at ``revision``; ``watch`` hands out a ``ScriptedWatch`` that
  yields exactly what the test puts in it (responses, exceptions), and is queued in ``streams`` so the
  test can pick it up with a deadline;
* faults: ``fail_next`` (the next txn raises it), ``unreachable`` (keep-alives fail as if etcd could not
  be reached).

The values Dynamo writes, for tests to put under the keys: ``endpoint_value`` and ``kv``.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdUnavailable
from sidecar.etcd.settings import Endpoint

LEASE = 0xA1


def endpoint_value(name: str, lease: int = LEASE, **extra: Any) -> bytes:
    """An endpoint entry as Dynamo writes it under ``v1/instances/``."""
    return json.dumps({"type": "Endpoint", "namespace": "ns", "component": "c", "endpoint": name,
                       "instance_id": lease, "transport": {"tcp": "h:1"}, **extra}).encode()


def kv(key: str, value: bytes, lease: int = LEASE, version: int = 1) -> pb.KeyValue:
    return pb.KeyValue(key=key.encode(), value=value, lease=lease, version=version)


class ScriptedWatch:
    """One watch stream: yields what the test puts in ``responses`` (an exception is raised), ends on close."""

    def __init__(self, creates: list[pb.WatchCreateRequest]) -> None:
        self.creates = creates
        self.responses: queue.Queue[pb.WatchResponse | Exception | None] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchResponse]:
        while True:
            item = self.responses.get()
            if item is None or self.closed.is_set():
                raise EtcdUnavailable("closed", "closed")
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()
        self.responses.put(None)

    def created(self) -> None:
        """etcd's answer to every create request: each watcher exists."""
        for create in self.creates:
            self.responses.put(pb.WatchResponse(watch_id=create.watch_id, created=True))


class ScriptedEtcd:
    """An in-memory etcd with leases, transactions and scripted watches (see the module docstring).

    ``lock`` guards ``kv``, ``leases``, ``txns`` and ``revision`` against the publisher's thread.
    """

    endpoint = Endpoint("etcd", 2379, False)
    request_timeout = 1.0

    def __init__(self) -> None:
        self.kv: dict[str, pb.KeyValue] = {}
        self.leases: set[int] = set()
        self.ids = itertools.count(0x100)
        self.txns: list[pb.TxnRequest] = []
        self.fail_next: Exception | None = None
        self.unreachable = False
        self.revision = 10
        self.ranges = 0
        self.streams: queue.Queue[ScriptedWatch] = queue.Queue()
        self.lock = threading.Lock()

    # -- leases -----------------------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> pb.LeaseGrantResponse:
        lease = next(self.ids)
        with self.lock:
            self.leases.add(lease)
        return pb.LeaseGrantResponse(ID=lease, TTL=ttl)

    def lease_revoke(self, lease: int) -> pb.LeaseRevokeResponse:
        with self.lock:
            self.leases.discard(lease)
            self.kv = {k: v for k, v in self.kv.items() if v.lease != lease}
        return pb.LeaseRevokeResponse()

    def lease_time_to_live(self, lease: int, keys: bool = False) -> pb.LeaseTimeToLiveResponse:
        with self.lock:
            return pb.LeaseTimeToLiveResponse(ID=lease, TTL=5 if lease in self.leases else -1)

    def lease_keep_alive_once(self, lease: int, timeout: float | None = None) -> int:
        if self.unreachable:
            raise EtcdUnavailable("etcd unreachable (scripted)", "unavailable")
        with self.lock:
            return 1 if lease in self.leases else 0

    # -- keys -------------------------------------------------------------------------------------
    def txn(self, request: pb.TxnRequest) -> pb.TxnResponse:
        with self.lock:
            if self.fail_next is not None:
                error, self.fail_next = self.fail_next, None
                raise error
            self.txns.append(request)
            ok = all(c.key.decode() not in self.kv for c in request.compare)
            ops = request.success if ok else request.failure
            responses = []
            self.revision += 1
            for op in ops:
                if op.HasField("request_put"):
                    put = op.request_put
                    old = self.kv.get(put.key.decode())
                    self.kv[put.key.decode()] = pb.KeyValue(
                        key=put.key, value=put.value, lease=put.lease, version=(old.version if old else 0) + 1,
                        mod_revision=self.revision,
                    )
                elif op.HasField("request_delete_range"):
                    self.kv.pop(op.request_delete_range.key.decode(), None)
                else:
                    key = op.request_range.key.decode()
                    kvs = [self.kv[key]] if key in self.kv else []
                    responses.append(pb.ResponseOp(response_range=pb.RangeResponse(kvs=kvs)))
            return pb.TxnResponse(succeeded=ok, responses=responses, header=pb.ResponseHeader(revision=self.revision))

    def range_prefix(self, prefix: bytes, *, revision: int = 0, page_size: int = 500) -> tuple[int, list[pb.KeyValue]]:
        with self.lock:
            self.ranges += 1
            return revision or self.revision, [v for k, v in sorted(self.kv.items()) if k.encode().startswith(prefix)]

    # -- watches ----------------------------------------------------------------------------------
    def watch(self, creates: list[pb.WatchCreateRequest], **_: Any) -> ScriptedWatch:
        stream = ScriptedWatch(list(creates))
        self.streams.put(stream)
        return stream
