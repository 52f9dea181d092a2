"""Run real relay processes (``discovery-sidecar relay``) and the TLS material they serve with.

A relay is a process like a sidecar (``devcluster.sidecars``) with no pod: it watches with its own
credentials (the admin kubeconfig in tests, a service account in a cluster) and serves sidecars over TLS.
Its key pair is made at test time by ``devcluster.pki`` (the same code that makes the API server's:
a CA, and a serving certificate for localhost and 127.0.0.1), so sidecars verify it for real.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from devcluster.cluster import free_port
from devcluster.pki import write_pki
from devcluster.processes import DaemonProcess, inherited_environment


@dataclass(frozen=True)
class RelayTls:
    """The relay's key pair and the CA bundle that verifies it (``DISCOVERY_UPSTREAM_CA``)."""

    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path


def make_relay_tls(directory: pathlib.Path) -> RelayTls:
    """A CA and a certificate for localhost/127.0.0.1 signed by it, in ``directory``."""
    paths = write_pki(directory)
    return RelayTls(cert=paths["serving.crt"], key=paths["serving.key"], ca=paths["ca.crt"])


@dataclass
class RelayProcess(DaemonProcess):
    """One ``discovery-sidecar relay`` subprocess."""

    kind = "relay"

    name: str
    kubeconfig: pathlib.Path
    tls: RelayTls
    log_path: pathlib.Path
    settings: Mapping[str, str]  # what it watches: DISCOVERY_NAMESPACES, DISCOVERY_SERVICE_NAME, ...
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What a sidecar's DISCOVERY_UPSTREAM names (the certificate is for localhost)."""
        return f"localhost:{self.grpc_port}"

    def env(self) -> dict[str, str]:
        env = inherited_environment()
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            DISCOVERY_RELAY_LISTEN=f"127.0.0.1:{self.grpc_port}",
            DISCOVERY_RELAY_TLS_CERT=str(self.tls.cert),
            DISCOVERY_RELAY_TLS_KEY=str(self.tls.key),
            DISCOVERY_HTTP_LISTEN=f"127.0.0.1:{self.http_port}",
            DISCOVERY_LOG_FORMAT="json",
            DISCOVERY_BACKOFF_MAX="2s",
        )
        env.update(self.settings)
        return env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sidecar.app.cli", "relay"]


def launch_relay(
    name: str,
    kubeconfig: pathlib.Path,
    tls: RelayTls,
    work_dir: pathlib.Path,
    settings: Mapping[str, str],
    start: bool = True,
) -> RelayProcess:
    """A relay watching as ``settings`` say, with the credentials of ``kubeconfig``, serving with ``tls``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    relay = RelayProcess(name, kubeconfig, tls, work_dir / f"{name}.log", dict(settings))
    return relay.start() if start else relay
