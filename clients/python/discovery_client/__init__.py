"""The Python client of the discovery sidecar's local API, for a pod's main container.

It needs only ``grpcio`` and ``protobuf``: a main container installs ``discovery-sidecar-client``
without the sidecar itself or the Kubernetes client. The generated stubs are
``discovery_client.api.discovery.v1`` (from ``protos/discovery/v1/discovery.proto``)::

    from discovery_client import DiscoveryClient, make_filter

    with DiscoveryClient("127.0.0.1:50051") as client:
        for update in client.watch(make_filter(selector="role=prefill")):
            print(update.kind, sorted(p.name for p in update.peers.values()))
"""

from importlib.metadata import PackageNotFoundError, version

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import (
    DEFAULT_TARGET,
    AsyncDiscoveryClient,
    DiscoveryClient,
    PeerSetUpdate,
    PeerSetView,
    make_filter,
    snapshot_peers,
)

try:
    __version__ = version("discovery-sidecar-client")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_TARGET",
    "AsyncDiscoveryClient",
    "DiscoveryClient",
    "PeerSetUpdate",
    "PeerSetView",
    "__version__",
    "make_filter",
    "pb",
    "snapshot_peers",
]
