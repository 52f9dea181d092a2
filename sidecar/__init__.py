"""Per-pod peer-discovery sidecar for Kubernetes, wire-compatible with NVIDIA Dynamo's discovery.

The package is split the way client-go's ``tools/cache`` is: ``sidecar.core`` is a pure,
IO-free core (selectors, the peer join, diffs, the revisioned event log) and everything
else is a thin shell around it (watches, registration, the gRPC and HTTP servers).
"""

__version__ = "0.1.0"
