"""Conversions between the core's values and the protobuf messages of ``discovery.v1``.

Kept apart from the servicer so the client module and the CLI share them, and so request validation
(selectors, groups) produces the same precise messages everywhere.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any

from google.protobuf import json_format, struct_pb2

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from sidecar.core.dynamo_entries import EndpointPathError, parse_endpoint_path
from sidecar.core.eventlog import ApiStatus
from sidecar.core.peer import Peer, PeerState
from sidecar.core.projection import EventType, GroupedPeer, PeerFilter
from sidecar.core.selectors import EVERYTHING, SelectorError, parse_selector

PEER_STATE = {PeerState.READY: pb.PEER_STATE_READY, PeerState.DRAINING: pb.PEER_STATE_DRAINING}
API_STATUS = {ApiStatus.CONNECTED: pb.API_STATUS_CONNECTED, ApiStatus.DEGRADED: pb.API_STATUS_DEGRADED}
EVENT_TYPE = {
    EventType.ADDED: pb.EVENT_TYPE_ADDED,
    EventType.UPDATED: pb.EVENT_TYPE_UPDATED,
    EventType.REMOVED: pb.EVENT_TYPE_REMOVED,
}
GROUP_NAME_MAX = 63


def to_struct(document: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(document)
    return struct


class PeerEncoder:
    """Encodes each peer value once and shares the message among every client that is sent it.

    Owns a bounded cache (least recently used first out) keyed by the peer object's identity; an entry
    holds the peer itself, so its ``id`` cannot be reused while cached. ``_lock`` guards ``_cache``:
    every WatchPeers and ListPeers thread calls ``encode``. Beyond ``capacity`` distinct peer values
    (the current peers plus recently replaced ones) a peer is simply encoded again.
    """

    def __init__(self, capacity: int = 16384) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[Peer, pb.Peer]] = OrderedDict()

    def encode(self, view: GroupedPeer) -> pb.Peer:
        """The peer's message for one client (its groups added to a copy of the shared one)."""
        base = self._shared(view.peer)
        if not view.groups:
            return base  # messages are copied when placed into a parent message, so sharing is safe
        message = pb.Peer()
        message.CopyFrom(base)
        message.groups.extend(view.groups)
        return message

    def _shared(self, peer: Peer) -> pb.Peer:
        key = id(peer)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] is peer:
                self._cache.move_to_end(key)
                return hit[1]
        message = encode_peer(peer)  # outside the lock: encoding is the expensive part
        with self._lock:
            self._cache[key] = (peer, message)
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return message


def encode_peer(peer: Peer) -> pb.Peer:
    """A peer's message, without groups."""
    message = pb.Peer(
        name=peer.name,
        namespace=peer.namespace,
        uid=peer.uid,
        instance_id=peer.instance_id,
        instance_id_hex=peer.instance_id_hex,
        addresses=peer.addresses,
        ports=[pb.Port(name=p.name, port=p.port, protocol=p.protocol, app_protocol=p.app_protocol) for p in peer.ports],
        labels=dict(peer.labels),
        state=PEER_STATE[peer.state],
        data_json=peer.data_json,
        node_name=peer.node_name,
        zone=peer.zone,
        hostname=peer.hostname,
        container=peer.container,
        endpoints=[
            pb.DynamoEndpoint(
                path=str(e.path),
                namespace=e.path.namespace,
                component=e.path.component,
                endpoint=e.path.endpoint,
                instance_id=e.instance_id,
                instance_id_hex=format(e.instance_id, "x"),
                transport_kind=e.transport_kind,
                transport_address=e.transport_address,
            )
            for e in peer.dynamo.endpoints
        ],
        models=[
            pb.DynamoModel(name=m.name, path=str(m.path), instance_id=m.instance_id, model_suffix=m.model_suffix)
            for m in peer.dynamo.models
        ],
        workers=[
            pb.Worker(
                url=w.url,
                port=w.port,
                protocol=w.protocol,
                bootstrap_port=w.bootstrap_port,
                model_id=w.model_id,
                kv_connector=w.kv_connector,
                kv_engine_id=w.kv_engine_id,
            )
            for w in peer.workers
        ],
    )
    message.data.update(peer.data)
    return message


def filter_from_pb(message: pb.PeerFilter) -> PeerFilter:
    """Validate and convert a request's filter; ValueError carries the INVALID_ARGUMENT text."""
    try:
        selector = parse_selector(message.selector) if message.selector else EVERYTHING
    except SelectorError as exc:
        raise ValueError(f"filter.selector: {exc}") from None
    groups = []
    seen = set()
    for index, group in enumerate(message.groups):
        if not group.name or len(group.name) > GROUP_NAME_MAX:
            raise ValueError(f"filter.groups[{index}].name must be 1-{GROUP_NAME_MAX} characters")
        if group.name in seen:
            raise ValueError(f"filter.groups[{index}].name {group.name!r} is used twice")
        seen.add(group.name)
        try:
            groups.append((group.name, parse_selector(group.selector)))
        except SelectorError as exc:
            raise ValueError(f"filter.groups[{index}] ({group.name}).selector: {exc}") from None
    try:
        endpoint = parse_endpoint_path(message.endpoint) if message.endpoint else None
    except EndpointPathError as exc:
        raise ValueError(f"filter.endpoint: {exc}") from None
    return PeerFilter(
        selector=selector,
        groups=tuple(groups),
        include_self=message.include_self,
        ready_only=message.ready_only,
        endpoint=endpoint,
        model=message.model,
    )


PUBLISH_MODES = (pb.PUBLISH_MODE_UNSPECIFIED, pb.PUBLISH_MODE_REPLACE, pb.PUBLISH_MODE_MERGE_PATCH)


def _not_a_json_number(name: str) -> Any:
    raise ValueError(f"data_json contains {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"data_json contains {text}, which is out of the range of a JSON number (a double)")
    return value


def document_from_publish(request: pb.PublishMetadataRequest) -> dict[str, Any]:
    """The document of a PublishMetadata request; ValueError for INVALID_ARGUMENT.

    Strict JSON: NaN and Infinity are refused (Python's decoder accepts them), and so is a mode this
    sidecar does not know (a newer client's mode must not be taken for REPLACE).
    """
    if request.mode not in PUBLISH_MODES:
        raise ValueError(f"mode {request.mode} is not a PublishMode this sidecar knows (REPLACE or MERGE_PATCH)")
    has_json = bool(request.data_json)
    has_struct = request.HasField("data")
    if has_json == has_struct:
        raise ValueError("set exactly one of data_json and data")
    if has_json:
        try:
            document = json.loads(request.data_json, parse_constant=_not_a_json_number, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data_json is not valid JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise ValueError("data_json is nested too deeply") from None
    else:
        document = json_format.MessageToDict(request.data)
    if not isinstance(document, dict):
        raise ValueError(f"the metadata must be a JSON object, got {type(document).__name__}")
    return document


def peer_from_pb_json(peer: pb.Peer) -> dict[str, Any]:
    """A received peer as plain JSON (for ``peers -o json``), with spec.data from its exact JSON."""
    result = json_format.MessageToDict(
        peer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    result["data"] = json.loads(peer.data_json) if peer.data_json else result.get("data", {})
    result.pop("data_json", None)
    result["instance_id"] = peer.instance_id
    result["state"] = pb.PeerState.Name(peer.state).removeprefix("PEER_STATE_").lower()
    return result
