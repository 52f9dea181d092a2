"""The etcd publisher on the scripted etcd (``tests.unit.fake_etcd``): transactions it sends, errors it
reports, lease loss.

The same against a real etcd (keys on the lease, keep-alive past the TTL, revoke, expiry, partition) is
covered in tests/integration/test_etcd_backend.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from devcluster.waiting import wait_for
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdPermissionDenied, EtcdTooLarge, EtcdUnavailable
from sidecar.etcd.publisher import MAX_TXN_KEYS, EtcdPublisher
from sidecar.peers.ports import Forbidden, Invalid, TooLarge, Unavailable
from tests.unit.fake_etcd import ScriptedEtcd

DEADLINE = 10.0


def endpoints(n: int) -> dict[str, Any]:
    return {
        "endpoints": {
            f"e{i}": {"type": "Endpoint", "namespace": "ns", "component": "c", "endpoint": f"e{i}",
                      "instance_id": 0, "transport": {"tcp": "h:1"}}
            for i in range(n)
        }
    }


def registered(client: ScriptedEtcd, data: dict[str, Any], ttl: int = 10) -> EtcdPublisher:
    publisher = EtcdPublisher(client, data, lease_ttl=ttl, backoff_max=0.05)  # type: ignore[arg-type]
    publisher.start()
    assert publisher.registered.wait(DEADLINE), publisher.problems()
    return publisher


def test_registration_creates_every_key_if_absent_in_transactions_etcd_accepts() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(MAX_TXN_KEYS + 6))
    try:
        assert [len(t.success) for t in client.txns] == [MAX_TXN_KEYS, 6]  # etcd allows 128 ops per txn
        assert all(c.target == pb.Compare.VERSION and c.version == 0 for t in client.txns for c in t.compare)
        lease = publisher.instance_id
        assert lease and {v.lease for v in client.kv.values()} == {lease}
        assert f"v1/instances/ns/c/e0/{lease:x}" in client.kv
    finally:
        publisher.stop()


def test_publish_writes_only_the_difference() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(3))
    try:
        client.txns.clear()
        data = endpoints(3)
        del data["endpoints"]["e2"]
        data["endpoints"]["e0"]["transport"] = {"tcp": "h:2"}
        publisher.publish(data, merge=False)
        (txn,) = client.txns
        assert len(txn.compare) == 0  # nothing new to create
        ops = sorted((op.WhichOneof("request"), (op.request_put.key or op.request_delete_range.key).decode())
                     for op in txn.success)
        lease = publisher.instance_id
        assert ops == [("request_delete_range", f"v1/instances/ns/c/e2/{lease:x}"),
                       ("request_put", f"v1/instances/ns/c/e0/{lease:x}")]
        assert publisher.registration().data == data
    finally:
        publisher.stop()


@pytest.mark.parametrize(
    ("error", "meaning"),
    [
        (EtcdPermissionDenied("etcd Txn: PERMISSION_DENIED", "permission-denied"), Forbidden),
        (EtcdTooLarge("etcd Txn: request is too large", "too-large"), TooLarge),
        (EtcdUnavailable("etcd Txn: UNAVAILABLE", "unavailable"), Unavailable),
    ],
)
def test_publish_failures_have_a_meaning_and_keep_the_previous_metadata(error: Exception, meaning: type) -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1))
    try:
        client.fail_next = error
        with pytest.raises(meaning):
            publisher.publish(endpoints(2), merge=False)
        assert publisher.registration().data == endpoints(1)
    finally:
        publisher.stop()


def test_publish_refuses_what_dynamo_would_not_read() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1))
    try:
        with pytest.raises(Invalid, match="transport is missing"):
            publisher.publish({"endpoints": {"x": {"type": "Endpoint", "namespace": "n", "component": "c",
                                                   "endpoint": "e", "instance_id": 0}}}, merge=False)
        with pytest.raises(Invalid, match="must be a JSON object"):
            publisher.publish({"model_cards": []}, merge=False)
    finally:
        publisher.stop()


def test_a_lease_etcd_no_longer_knows_is_replaced_by_a_new_one() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1), ttl=1)
    try:
        first = publisher.instance_id
        assert first is not None
        client.lease_revoke(first)
        wait_for(lambda: publisher.instance_id not in (None, first) and publisher.registered.is_set(), DEADLINE,
                 "registration with a new lease")
        second = publisher.instance_id
        assert second is not None and f"v1/instances/ns/c/e0/{second:x}" in client.kv
        assert publisher.leases_granted == 2
    finally:
        publisher.stop()


def test_a_ttl_without_renewal_is_presumed_lost_and_kept_if_etcd_still_has_the_lease() -> None:
    """After etcd restarts it renews every lease: the first answer, not the local clock, decides."""
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1), ttl=1)
    try:
        lease = publisher.instance_id
        client.unreachable = True
        wait_for(lambda: not publisher.registered.is_set(), DEADLINE, "the unrenewed lease presumed lost")
        assert "presumed lost" in publisher.problems()[0] and publisher.instance_id == lease
        client.unreachable = False
        wait_for(publisher.registered.is_set, DEADLINE, "registered again once etcd answers")
        assert publisher.instance_id == lease and publisher.leases_granted == 1 and publisher.problems() == []
    finally:
        publisher.stop()


def test_a_presumed_lost_lease_etcd_no_longer_has_is_replaced() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1), ttl=1)
    try:
        lease = publisher.instance_id
        assert lease is not None
        client.unreachable = True
        wait_for(lambda: not publisher.registered.is_set(), DEADLINE, "the unrenewed lease presumed lost")
        client.lease_revoke(lease)  # etcd expired it meanwhile
        client.unreachable = False
        wait_for(lambda: publisher.registered.is_set() and publisher.instance_id != lease, DEADLINE, "a new lease")
        assert publisher.leases_granted == 2
    finally:
        publisher.stop()


def test_deregister_revokes_and_nothing_is_written_afterwards() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(2))
    assert publisher.deregister()
    assert client.kv == {} and not publisher.registered.is_set()
    with pytest.raises(Unavailable, match="deregistering"):
        publisher.publish(endpoints(1), merge=False)


# -- following its own keys (the own-keys watch calls ``check``; issue 19) -------------------------------------
def stored(client: ScriptedEtcd, key: str) -> tuple[bytes, int] | None:
    """What etcd holds under ``key`` now: its value and lease (None: absent)."""
    with client.lock:
        kv = client.kv.get(key)
    return None if kv is None else (kv.value, kv.lease)


def test_its_own_writes_seen_by_the_watch_change_nothing() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1))
    try:
        lease = publisher.instance_id
        assert lease is not None
        (key,) = publisher.written_keys()
        value = client.kv[key].value
        with structlog.testing.capture_logs() as logs:
            publisher.check(lease, key, value, lease)
            publisher.check(lease + 1, key, None, 0)  # about another lease: not this one's business
        assert logs == [] and not publisher._repair
    finally:
        publisher.stop()


def test_a_deleted_or_overwritten_key_is_written_again_under_the_same_lease() -> None:
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(2))
    try:
        lease = publisher.instance_id
        assert lease is not None
        key = sorted(publisher.written_keys())[0]
        value = client.kv[key].value
        with structlog.testing.capture_logs() as logs:
            del client.kv[key]
            publisher.check(lease, key, None, 0)
            wait_for(lambda: stored(client, key) == (value, lease), DEADLINE, "the key written again")
            client.kv[key] = pb.KeyValue(key=key.encode(), value=b"{}", lease=0)
            publisher.check(lease, key, b"{}", 0)
            wait_for(lambda: stored(client, key) == (value, lease), DEADLINE, "the value restored")
            wait_for(lambda: len([e for e in logs if e["event"] == "registration restored"]) == 2, DEADLINE, "logged")
        lost = [e["reason"] for e in logs if e["event"] == "registration lost; restoring it"]
        assert lost == ["keys_deleted", "keys_altered"]
        assert publisher.instance_id == lease and publisher.leases_granted == 1
    finally:
        publisher.stop()


def test_keys_gone_with_a_revoked_lease_bring_a_new_lease_at_once() -> None:
    """All keys deleted because the lease was revoked: the lease is asked about and replaced, without waiting
    for the next renewal (TTL/2 = 30 s here)."""
    client = ScriptedEtcd()
    publisher = registered(client, endpoints(1), ttl=60)
    try:
        lease = publisher.instance_id
        assert lease is not None
        (key,) = publisher.written_keys()
        client.lease_revoke(lease)
        publisher.check(lease, key, None, 0)
        wait_for(lambda: publisher.instance_id not in (None, lease), DEADLINE, "a new lease")
        assert publisher.leases_granted == 2
    finally:
        publisher.stop()
