"""The hand-written etcd protos: the committed stubs match them, and the field numbers are etcd's."""

from __future__ import annotations

import pathlib

import pytest

from sidecar.etcd import generate
from sidecar.etcd._pb import etcd_v3_pb2 as pb


def test_committed_stubs_match_the_proto(tmp_path: pathlib.Path) -> None:
    for path in generate.generate(tmp_path):
        committed = generate.OUT_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} drifted: run python -m sidecar.etcd.generate"


# From etcd v3.6's api/etcdserverpb/rpc.proto and api/mvccpb/kv.proto: (message, field) -> number.
ETCD_FIELD_NUMBERS = {
    ("KeyValue", "key"): 1, ("KeyValue", "create_revision"): 2, ("KeyValue", "mod_revision"): 3,
    ("KeyValue", "version"): 4, ("KeyValue", "value"): 5, ("KeyValue", "lease"): 6,
    ("Event", "type"): 1, ("Event", "kv"): 2, ("Event", "prev_kv"): 3,
    ("ResponseHeader", "revision"): 3,
    ("RangeRequest", "key"): 1, ("RangeRequest", "range_end"): 2, ("RangeRequest", "limit"): 3,
    ("RangeRequest", "revision"): 4, ("RangeResponse", "kvs"): 2, ("RangeResponse", "more"): 3,
    ("PutRequest", "lease"): 3, ("PutRequest", "prev_kv"): 4,
    ("RequestOp", "request_range"): 1, ("RequestOp", "request_put"): 2,
    ("RequestOp", "request_delete_range"): 3, ("RequestOp", "request_txn"): 4,
    ("ResponseOp", "response_range"): 1, ("ResponseOp", "response_txn"): 4,
    ("Compare", "result"): 1, ("Compare", "target"): 2, ("Compare", "key"): 3, ("Compare", "version"): 4,
    ("Compare", "lease"): 8, ("Compare", "range_end"): 64,
    ("TxnRequest", "compare"): 1, ("TxnRequest", "success"): 2, ("TxnRequest", "failure"): 3,
    ("TxnResponse", "succeeded"): 2, ("TxnResponse", "responses"): 3,
    ("CompactionRequest", "revision"): 1, ("CompactionRequest", "physical"): 2,
    ("WatchRequest", "create_request"): 1, ("WatchRequest", "progress_request"): 3,
    ("WatchCreateRequest", "start_revision"): 3, ("WatchCreateRequest", "progress_notify"): 4,
    ("WatchCreateRequest", "prev_kv"): 6, ("WatchCreateRequest", "watch_id"): 7,
    ("WatchResponse", "watch_id"): 2, ("WatchResponse", "created"): 3, ("WatchResponse", "canceled"): 4,
    ("WatchResponse", "compact_revision"): 5, ("WatchResponse", "cancel_reason"): 6, ("WatchResponse", "events"): 11,
    ("LeaseGrantRequest", "TTL"): 1, ("LeaseGrantResponse", "ID"): 2, ("LeaseGrantResponse", "TTL"): 3,
    ("LeaseGrantResponse", "error"): 4, ("LeaseKeepAliveResponse", "TTL"): 3,
    ("LeaseTimeToLiveRequest", "keys"): 2, ("LeaseTimeToLiveResponse", "keys"): 5,
    ("AuthenticateRequest", "name"): 1, ("AuthenticateRequest", "password"): 2, ("AuthenticateResponse", "token"): 2,
}


@pytest.mark.parametrize(("message", "field"), sorted(ETCD_FIELD_NUMBERS))
def test_field_numbers_are_etcds(message: str, field: str) -> None:
    descriptor = getattr(pb, message).DESCRIPTOR
    assert descriptor.fields_by_name[field].number == ETCD_FIELD_NUMBERS[(message, field)]


def test_enum_values_are_etcds() -> None:
    assert (pb.Event.PUT, pb.Event.DELETE) == (0, 1)
    assert (pb.Compare.EQUAL, pb.Compare.NOT_EQUAL) == (0, 3)
    assert (pb.Compare.VERSION, pb.Compare.LEASE) == (0, 4)
