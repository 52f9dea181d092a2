"""A standalone, real etcd on loopback for the etcd backend's tests (no Kubernetes around it).

The binary is the one the project builds for the control plane (``devcluster.build``; etcd 3.6).
Each server gets its own work directory (data, certificates, log) and random free loopback ports, so
several can run side by side and beside a control plane. Like ``devcluster.cluster`` the process runs
in its own process group and, with ``tie_to_parent`` (tests), dies with the Python process.

* ``restart()`` stops and starts the same member on the same ports and data: clients see the
  connection drop and the history survive.
* ``tls=True`` serves clients over TLS with client-certificate authentication (a throwaway CA, a
  serving certificate for 127.0.0.1/localhost and a client certificate, all PEM in ``work_dir/pki``).
* ``enable_auth(user, password)`` turns etcd's authentication on (a root user and role), as an
  operator would with ``etcdctl user add root && etcdctl auth enable``.
* ``revision()`` and ``compact()`` speak etcd's JSON gateway (``/v3/...``), so tests need no client
  (and no ``etcdctl``, which the project does not build) to drive the server's history.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import pathlib
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devcluster.build import ensure_built
from devcluster.cluster import Component, free_port

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(f"[devcluster.etcd] {message}", file=sys.stderr, flush=True)


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class EtcdPki:
    """PEM files: the CA, the server's certificate and key, and a client's certificate and key."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path


def write_etcd_pki(directory: pathlib.Path, client_name: str = "discovery-sidecar") -> EtcdPki:
    """A CA, a serving certificate for 127.0.0.1/localhost and a client certificate (CN ``client_name``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, path: pathlib.Path) -> None:
        path.write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        path.chmod(0o600)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("devcluster-etcd-ca"))
        .issuer_name(name("devcluster-etcd-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usages: list[x509.ObjectIdentifier], san: bool) -> tuple[x509.Certificate, Any]:
        leaf_key = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), leaf_key

    # etcd's own gRPC gateway dials the server with the serving certificate: it must be a client's too.
    server_cert, server_key = leaf(
        "etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], san=True
    )
    client_cert, client_key = leaf(client_name, [ExtendedKeyUsageOID.CLIENT_AUTH], san=False)
    pki = EtcdPki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, pki.server_key)
    pki.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(client_key, pki.client_key)
    return pki


@dataclass
class EtcdServer:
    """One etcd member on loopback: start, stop, restart, and its history (revision, compaction)."""

    work_dir: pathlib.Path
    bin_dir: pathlib.Path | None = None
    tls: bool = False
    tie_to_parent: bool = True
    log: Log = _say
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    pki: EtcdPki | None = None
    component: Component | None = None
    _auth: tuple[str, str] | None = None

    # -- addresses ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def binary(self) -> pathlib.Path:
        return (self.bin_dir or ensure_built(self.log)) / "etcd"

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.tls and self.pki is None:
            self.pki = write_etcd_pki(self.work_dir / "pki")
        self.component = Component("etcd", self._argv(), self.work_dir / "etcd.log")
        self.log(f"starting etcd on {self.url}")
        self.component.start(self.tie_to_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.component.alive():
                raise RuntimeError(f"etcd exited during start-up; its log ends with:\n{self.component.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)  # poll: start-up has no event to wait on
        tail = self.component.log_tail()
        self.stop()
        raise TimeoutError(f"etcd not ready after {timeout:.0f}s; its log ends with:\n{tail}")

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()

    def kill(self) -> None:
        """SIGKILL, as a crashed node: no graceful stop, during which etcd would still expire leases."""
        component = self.component
        if component is not None and component.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(component.process.pid, signal.SIGKILL)
            component.process.wait(10)
            component.process = None

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the same member: same ports, same data, same certificates."""
        self.stop()
        self.start(timeout)

    def alive(self) -> bool:
        return self.component is not None and self.component.alive()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- health and history through the JSON gateway --------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls or self.pki is None:
            return None
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return context

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2, context=self._ssl_context()) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def post(self, path: str, body: dict[str, Any], authenticate: bool = True) -> dict[str, Any]:
        """One JSON gateway call (``/v3/kv/range``, ``/v3/kv/put``, ...); bytes fields are base64."""
        headers = {"Content-Type": "application/json"}
        token = self._token() if authenticate else None
        if token:
            headers["Authorization"] = token
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=self._ssl_context()) as response:
            reply: dict[str, Any] = json.loads(response.read())
            return reply

    def _token(self) -> str | None:
        if self._auth is None:
            return None
        user, password = self._auth
        reply = self.post("/v3/auth/authenticate", {"name": user, "password": password}, authenticate=False)
        return str(reply["token"])

    def revision(self) -> int:
        reply = self.post("/v3/kv/range", {"key": _b64("\0"), "limit": 1})
        return int(reply["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current one); return it."""
        revision = revision or self.revision()
        self.post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        """Put one key (a writer other than the code under test); return the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.post("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.post("/v3/kv/deleterange", {"key": _b64(key)})["header"]["revision"])

    def get_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        """key -> {"value": bytes, "lease": int, "version": int, ...} for every key under ``prefix``."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        reply = self.post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        out: dict[str, dict[str, Any]] = {}
        for kv in reply.get("kvs") or ():
            key = base64.b64decode(kv["key"]).decode()
            out[key] = {
                "value": base64.b64decode(kv.get("value", "")),
                "lease": int(kv.get("lease", 0)),
                "version": int(kv.get("version", 0)),
                "create_revision": int(kv.get("create_revision", 0)),
                "mod_revision": int(kv.get("mod_revision", 0)),
            }
        return out

    def lease_ttl(self, lease: int) -> int:
        """The lease's remaining TTL in seconds; -1 once it is gone."""
        return int(self.post("/v3/lease/timetolive", {"ID": str(lease)}).get("TTL", -1))

    def enable_auth(self, user: str = "root", password: str = "root-password") -> None:
        """Create ``user`` with the root role and turn authentication on (then every call needs it).

        Plain-text servers only: etcd's JSON gateway refuses every request from a client that presents a
        certificate once authentication is on, so a TLS server's users are managed with a gRPC client.
        """
        if self.tls:
            raise ValueError("enable_auth() goes through the JSON gateway, which etcd refuses with client certificates")
        self.post("/v3/auth/role/add", {"name": "root"})
        self.post("/v3/auth/user/add", {"name": user, "password": password})
        self.post("/v3/auth/user/grant", {"user": user, "role": "root"})
        self.post("/v3/auth/enable", {})
        self._auth = (user, password)

    def add_user(self, user: str, password: str, prefix: str | None = None) -> None:
        """A user with read/write on ``prefix`` (all keys when None)."""
        role = f"role-{user}"
        self.post("/v3/auth/role/add", {"name": role})
        if prefix is None:
            key, end = _b64("\0"), _b64("\0")
        else:
            key, end = _b64(prefix), _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        self.post(
            "/v3/auth/role/grant",
            {"name": role, "perm": {"permType": "READWRITE", "key": key, "range_end": end}},
        )
        self.post("/v3/auth/user/add", {"name": user, "password": password})
        self.post("/v3/auth/user/grant", {"user": user, "role": role})

    # -- internals ------------------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            str(self.binary),
            "--name=standalone",
            f"--data-dir={self.work_dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=standalone={peer}",
            "--unsafe-no-fsync=true",  # a throwaway test store: durability buys nothing, fsync costs seconds
            "--log-level=warn",
        ]
        if self.tls and self.pki is not None:
            argv += [
                f"--cert-file={self.pki.server_cert}",
                f"--key-file={self.pki.server_key}",
                f"--trusted-ca-file={self.pki.ca}",
                "--client-cert-auth=true",
            ]
        return argv
