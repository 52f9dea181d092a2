"""The backend choice: the one place that names the backends (``DYN_DISCOVERY_BACKEND``).

Each backend is a package that owns its settings (``settings.py``: its options table, cross-checks and
settings record) and a ``backend.py`` whose ``build`` returns one ``sidecar.peers.backend.Backend``. The
settings modules are light (no client library) and are imported here for the options tables that
``--help`` and the configuration need; a ``backend.py`` (and its client: the official Kubernetes client,
or the etcd gRPC stubs) is imported only when that backend is chosen, in ``build``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from sidecar.etcd import settings as etcd_settings
from sidecar.kube import settings as kube_settings
from sidecar.peers.backend import Backend, BackendSettings, RelayBackend, SharedSettings
from sidecar.peers.metrics import Metrics
from sidecar.peers.options import Option, OptionReader
from sidecar.peers.ports import PodIdentity


class BackendName(StrEnum):
    """Dynamo's names for its discovery backends."""

    KUBERNETES = "kubernetes"  # CRs and EndpointSlices (or Pods)
    ETCD = "etcd"  # Dynamo's v1/ keys on a lease


OPTION_TABLES: dict[BackendName, tuple[Option, ...]] = {
    BackendName.KUBERNETES: kube_settings.OPTIONS,
    BackendName.ETCD: etcd_settings.OPTIONS,
}
"""Each backend's own options (``--help`` lists them all)."""


def load_settings(
    name: BackendName, reader: OptionReader, identity: PodIdentity, registers: bool = True, follows_relay: bool = False
) -> kube_settings.KubeSettings | etcd_settings.EtcdSettings | None:
    """The chosen backend's settings, read by its own loader; None when any problem was recorded.

    The other backends' options are handed over as ``foreign``: the loader refuses those that would
    silently mean nothing under it.
    """
    foreign: Sequence[Option] = [o for other, table in OPTION_TABLES.items() if other is not name for o in table]
    if name is BackendName.ETCD:
        return etcd_settings.load(reader, foreign)
    return kube_settings.load(reader, identity, foreign, registers=registers, follows_relay=follows_relay)


def build(
    name: BackendName,
    settings: SharedSettings,
    backend_settings: BackendSettings,
    metrics: Metrics,
    transport: object | None = None,
) -> Backend:
    """Build the chosen backend (importing it now). ``transport``: an already-made client of that
    backend (tests inject one; a ``KubeApi`` or an ``EtcdClient``), else the backend makes its own."""
    if name is BackendName.ETCD:
        from sidecar.etcd.backend import build as build_etcd

        assert isinstance(backend_settings, etcd_settings.EtcdSettings), "load_settings read the etcd table"
        return build_etcd(settings, backend_settings, metrics, transport)
    # The official Kubernetes client costs ~33 MiB and ~0.5 s of start-up, which a sidecar on the etcd
    # backend never needs (bench/RESULTS.md, etcd section): imported only here.
    from sidecar.kube.backend import build as build_kube

    assert isinstance(backend_settings, kube_settings.KubeSettings), "load_settings read the Kubernetes table"
    return build_kube(settings, backend_settings, metrics, transport)


def build_relay(
    settings: SharedSettings,
    backend_settings: BackendSettings,
    metrics: Metrics,
    access_ttl: float,
    transport: object | None = None,
) -> RelayBackend:
    """A relay's watches and access reviews (Kubernetes only: it authorises clients by their tokens)."""
    from sidecar.kube.backend import build_relay as build_kube_relay

    assert isinstance(backend_settings, kube_settings.KubeSettings), "the relay reads the Kubernetes table"
    return build_kube_relay(settings, backend_settings, metrics, access_ttl, transport)
