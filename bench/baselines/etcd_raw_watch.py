"""The floor for the etcd backend: a raw etcd watch, as little as a reader of Dynamo's keys can do.

``python -m bench.baselines.etcd_raw_watch HOST:PORT``: list ``v1/`` at one revision, keep every key's
value in a dict (the least state any reader needs), then watch from the next revision with previous
values, and print one JSON line per event, flushed at once, as the Go and Rust baselines do:
``{"t": ns, "src": "etcd", "type": "PUT"|"DELETE", "name": lease in hex, "seq": bench_seq}``. No
parsing beyond ``json.loads`` of the value, no join, no gRPC server: the sidecar's extra cost over
this is what its join, log and local API cost. It uses the same generated stubs and grpcio as the
sidecar, so the difference is the sidecar's work, not a faster library.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import grpc

from sidecar.etcd._pb import etcd_v3_pb2 as pb

PREFIX = b"v1/"
PREFIX_END = b"v1" + bytes([ord("/") + 1])


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps({"t": time.time_ns(), **fields}) + "\n")
    sys.stdout.flush()


def seq_of(value: bytes) -> int | None:
    try:
        entry = json.loads(value)
    except ValueError:
        return None
    seq = entry.get("bench_seq") if isinstance(entry, dict) else None
    return seq if isinstance(seq, int) else None


def main(target: str) -> None:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    range_call = channel.unary_unary(
        "/etcdserverpb.KV/Range",
        request_serializer=pb.RangeRequest.SerializeToString,
        response_deserializer=pb.RangeResponse.FromString,
    )
    reply = range_call(pb.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=60)
    cache = {kv.key: kv.value for kv in reply.kvs}
    emit(src="list", type="SYNCED", keys=len(cache))
    watch = channel.stream_stream(
        "/etcdserverpb.Watch/Watch",
        request_serializer=pb.WatchRequest.SerializeToString,
        response_deserializer=pb.WatchResponse.FromString,
    )
    create = pb.WatchCreateRequest(
        key=PREFIX, range_end=PREFIX_END, start_revision=reply.header.revision + 1, prev_kv=True
    )

    def requests() -> Iterator[pb.WatchRequest]:
        yield pb.WatchRequest(create_request=create)
        while True:
            time.sleep(3600)  # keep the request side open; the process is terminated when done

    for response in watch(requests()):
        if response.created:
            emit(src="watch", type="SYNCED")
            continue
        for event in response.events:
            kv, prev = event.kv, event.prev_kv
            lease = kv.lease or prev.lease
            if event.type == pb.Event.DELETE:
                cache.pop(kv.key, None)
                emit(src="etcd", type="DELETE", name=f"{lease:x}", seq=None)
            else:
                cache[kv.key] = kv.value
                emit(src="etcd", type="PUT", name=f"{lease:x}", seq=seq_of(kv.value))


if __name__ == "__main__":
    main(sys.argv[1])
