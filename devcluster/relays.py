"""Run real relay processes (``discovery-sidecar relay``) and the TLS material they serve with.

A relay is a process like a sidecar (``devcluster.sidecars``) with no pod: it watches with its own
credentials (the admin kubeconfig in tests, a service account in a cluster) and serves sidecars over TLS.
Its key pair is made at test time by ``devcluster.pki`` (the same code that makes the API server's:
a CA, and a serving certificate for localhost and 127.0.0.1), so sidecars verify it for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devcluster.cluster import free_port
from devcluster.pki import write_pki
from devcluster.waiting import wait_for


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
class RelayProcess:
    """One ``discovery-sidecar relay`` subprocess."""

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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCOVERY_", "POD_", "ETCD_", "DYN_"))}
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

    def start(self) -> RelayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar.app.cli", "relay"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"relay {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        return self.http_get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 30.0) -> RelayProcess:
        wait_for(self.ready, timeout, what=f"relay {self.name} ready")
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def kill(self) -> None:
        """SIGKILL: a replica that dies without a word (its streams break, nothing is said)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


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
