"""Per-pod peer-discovery sidecar for Kubernetes, wire-compatible with NVIDIA Dynamo's discovery.

The package is split the way client-go's ``tools/cache`` is: ``sidecar.core`` is a pure,
IO-free core (selectors, the peer join, diffs, the revisioned event log) and everything
else is a thin shell around it (watches, registration, the gRPC and HTTP servers).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("discovery-sidecar")  # pyproject.toml's, the one place the version is written
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
