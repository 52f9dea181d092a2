from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PEER_STATE_UNSPECIFIED: _ClassVar[PeerState]
    PEER_STATE_READY: _ClassVar[PeerState]
    PEER_STATE_DRAINING: _ClassVar[PeerState]

class ApiStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_STATUS_UNSPECIFIED: _ClassVar[ApiStatus]
    API_STATUS_CONNECTED: _ClassVar[ApiStatus]
    API_STATUS_DEGRADED: _ClassVar[ApiStatus]

class SnapshotReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_REASON_UNSPECIFIED: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_INITIAL: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_RESUME_UNAVAILABLE: _ClassVar[SnapshotReason]
    SNAPSHOT_REASON_CLIENT_TOO_SLOW: _ClassVar[SnapshotReason]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_ADDED: _ClassVar[EventType]
    EVENT_TYPE_UPDATED: _ClassVar[EventType]
    EVENT_TYPE_REMOVED: _ClassVar[EventType]

class PublishMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUBLISH_MODE_UNSPECIFIED: _ClassVar[PublishMode]
    PUBLISH_MODE_REPLACE: _ClassVar[PublishMode]
    PUBLISH_MODE_MERGE_PATCH: _ClassVar[PublishMode]
PEER_STATE_UNSPECIFIED: PeerState
PEER_STATE_READY: PeerState
PEER_STATE_DRAINING: PeerState
API_STATUS_UNSPECIFIED: ApiStatus
API_STATUS_CONNECTED: ApiStatus
API_STATUS_DEGRADED: ApiStatus
SNAPSHOT_REASON_UNSPECIFIED: SnapshotReason
SNAPSHOT_REASON_INITIAL: SnapshotReason
SNAPSHOT_REASON_RESUME_UNAVAILABLE: SnapshotReason
SNAPSHOT_REASON_CLIENT_TOO_SLOW: SnapshotReason
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_ADDED: EventType
EVENT_TYPE_UPDATED: EventType
EVENT_TYPE_REMOVED: EventType
PUBLISH_MODE_UNSPECIFIED: PublishMode
PUBLISH_MODE_REPLACE: PublishMode
PUBLISH_MODE_MERGE_PATCH: PublishMode

class PeerFilter(_message.Message):
    __slots__ = ("selector", "groups", "include_self", "ready_only", "endpoint", "model")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SELF_FIELD_NUMBER: _ClassVar[int]
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    selector: str
    groups: _containers.RepeatedCompositeFieldContainer[PeerGroup]
    include_self: bool
    ready_only: bool
    endpoint: str
    model: str
    def __init__(self, selector: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[PeerGroup, _Mapping]]] = ..., include_self: _Optional[bool] = ..., ready_only: _Optional[bool] = ..., endpoint: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class PeerGroup(_message.Message):
    __slots__ = ("name", "selector")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: str
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[str] = ...) -> None: ...

class Port(_message.Message):
    __slots__ = ("name", "port", "protocol", "app_protocol")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    APP_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    protocol: str
    app_protocol: str
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., app_protocol: _Optional[str] = ...) -> None: ...

class DynamoEndpoint(_message.Message):
    __slots__ = ("path", "namespace", "component", "endpoint", "instance_id", "instance_id_hex", "transport_kind", "transport_address")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_HEX_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_KIND_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    path: str
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    instance_id_hex: str
    transport_kind: str
    transport_address: str
    def __init__(self, path: _Optional[str] = ..., namespace: _Optional[str] = ..., component: _Optional[str] = ..., endpoint: _Optional[str] = ..., instance_id: _Optional[int] = ..., instance_id_hex: _Optional[str] = ..., transport_kind: _Optional[str] = ..., transport_address: _Optional[str] = ...) -> None: ...

class DynamoModel(_message.Message):
    __slots__ = ("name", "path", "instance_id", "model_suffix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    instance_id: int
    model_suffix: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., instance_id: _Optional[int] = ..., model_suffix: _Optional[str] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "namespace", "uid", "instance_id", "instance_id_hex", "addresses", "ports", "labels", "state", "data", "data_json", "node_name", "zone", "hostname", "groups", "endpoints", "models", "workers", "container")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_HEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    uid: str
    instance_id: int
    instance_id_hex: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    ports: _containers.RepeatedCompositeFieldContainer[Port]
    labels: _containers.ScalarMap[str, str]
    state: PeerState
    data: _struct_pb2.Struct
    data_json: str
    node_name: str
    zone: str
    hostname: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    endpoints: _containers.RepeatedCompositeFieldContainer[DynamoEndpoint]
    models: _containers.RepeatedCompositeFieldContainer[DynamoModel]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    container: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., uid: _Optional[str] = ..., instance_id: _Optional[int] = ..., instance_id_hex: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., ports: _Optional[_Iterable[_Union[Port, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[PeerState, str]] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., data_json: _Optional[str] = ..., node_name: _Optional[str] = ..., zone: _Optional[str] = ..., hostname: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., endpoints: _Optional[_Iterable[_Union[DynamoEndpoint, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[DynamoModel, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., container: _Optional[str] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("url", "port", "protocol", "bootstrap_port", "model_id", "kv_connector", "kv_engine_id")
    URL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_PORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KV_CONNECTOR_FIELD_NUMBER: _ClassVar[int]
    KV_ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    url: str
    port: int
    protocol: str
    bootstrap_port: int
    model_id: str
    kv_connector: str
    kv_engine_id: str
    def __init__(self, url: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ..., bootstrap_port: _Optional[int] = ..., model_id: _Optional[str] = ..., kv_connector: _Optional[str] = ..., kv_engine_id: _Optional[str] = ...) -> None: ...

class WatchPeersRequest(_message.Message):
    __slots__ = ("filter", "resume_history_id", "resume_revision")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RESUME_HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_REVISION_FIELD_NUMBER: _ClassVar[int]
    filter: PeerFilter
    resume_history_id: str
    resume_revision: int
    def __init__(self, filter: _Optional[_Union[PeerFilter, _Mapping]] = ..., resume_history_id: _Optional[str] = ..., resume_revision: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("peers", "reason", "status")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    reason: SnapshotReason
    status: ApiStatus
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., reason: _Optional[_Union[SnapshotReason, str]] = ..., status: _Optional[_Union[ApiStatus, str]] = ...) -> None: ...

class PeerEvent(_message.Message):
    __slots__ = ("type", "peer")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    peer: Peer
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., peer: _Optional[_Union[Peer, _Mapping]] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[PeerEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[PeerEvent, _Mapping]]] = ...) -> None: ...

class Resumed(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ApiStatus
    def __init__(self, status: _Optional[_Union[ApiStatus, str]] = ...) -> None: ...

class StatusChange(_message.Message):
    __slots__ = ("status", "reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: ApiStatus
    reason: str
    def __init__(self, status: _Optional[_Union[ApiStatus, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchPeersResponse(_message.Message):
    __slots__ = ("revision", "history_id", "snapshot", "delta", "resumed", "status", "partial")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    revision: int
    history_id: str
    snapshot: Snapshot
    delta: Delta
    resumed: Resumed
    status: StatusChange
    partial: bool
    def __init__(self, revision: _Optional[int] = ..., history_id: _Optional[str] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., delta: _Optional[_Union[Delta, _Mapping]] = ..., resumed: _Optional[_Union[Resumed, _Mapping]] = ..., status: _Optional[_Union[StatusChange, _Mapping]] = ..., partial: _Optional[bool] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ("filter", "max_reply_bytes")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    filter: PeerFilter
    max_reply_bytes: int
    def __init__(self, filter: _Optional[_Union[PeerFilter, _Mapping]] = ..., max_reply_bytes: _Optional[int] = ...) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("revision", "history_id", "peers", "status")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    history_id: str
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    status: ApiStatus
    def __init__(self, revision: _Optional[int] = ..., history_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., status: _Optional[_Union[ApiStatus, str]] = ...) -> None: ...

class GetSelfRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSelfResponse(_message.Message):
    __slots__ = ("name", "namespace", "uid", "instance_id", "instance_id_hex", "registered", "metadata_resource_version", "data", "data_json", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_HEX_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    METADATA_RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    uid: str
    instance_id: int
    instance_id_hex: str
    registered: bool
    metadata_resource_version: str
    data: _struct_pb2.Struct
    data_json: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., uid: _Optional[str] = ..., instance_id: _Optional[int] = ..., instance_id_hex: _Optional[str] = ..., registered: _Optional[bool] = ..., metadata_resource_version: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., data_json: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PublishMetadataRequest(_message.Message):
    __slots__ = ("data_json", "data", "mode")
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    data_json: str
    data: _struct_pb2.Struct
    mode: PublishMode
    def __init__(self, data_json: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., mode: _Optional[_Union[PublishMode, str]] = ...) -> None: ...

class PublishMetadataResponse(_message.Message):
    __slots__ = ("metadata_resource_version", "data_json")
    METADATA_RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    metadata_resource_version: str
    data_json: str
    def __init__(self, metadata_resource_version: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...
