"""Configuration: downward-API identity and ``DISCOVERY_*`` settings, each with a matching CLI flag.

Environment variables are the pod spec's natural language, so they are the contract; flags mirror them
for local runs. Option tables drive the parser, ``--help`` and the README, so the three cannot drift:
the common table here (``COMMON_OPTIONS``: the pod's identity, the pod-facing API, the modes, timeouts
and history) and each backend's own (``sidecar.kube.settings``, ``sidecar.etcd.settings``, which also
hold their cross-checks and settings records). ``OPTIONS`` is all of them. Precedence, for every table:
flag, then environment, then default; for the pod identity Dynamo's order is kept (a downward-API file
in ``/etc/podinfo`` wins over the environment variable), so a pod configured for Dynamo configures the
sidecar the same way.

Every problem is reported as a ``ConfigError`` naming the variable, the flag, what was expected and
what was found, and all problems are reported at once, so a broken pod spec is fixed in one go. Modes
are parsed once, into enums (``WatchMode``, ``RegisterMode``, ``BackendName``, ...).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from sidecar.app.backends import OPTION_TABLES, BackendName
from sidecar.app.backends import load_settings as load_backend_settings
from sidecar.app.logs import LogFormat, LogLevel
from sidecar.core.dynamo_schema import dynamo_metadata_problem
from sidecar.core.resources import validate_worker_data
from sidecar.core.selectors import SelectorError, selector_from_labels
from sidecar.core.smg_manifest import SmgManifestSettings
from sidecar.peers.backend import BackendSettings, Upstream
from sidecar.peers.options import (
    Option,
    known,
    parse_choice,
    parse_duration,
    parse_positive_int,
)
from sidecar.peers.ports import ListenAddress, PodIdentity, RegisterMode, TlsFiles, WatchMode
from sidecar.serve.http_server import DebugPeers

_T = TypeVar("_T")


class ConfigError(ValueError):
    """Start-up cannot proceed; the message lists every bad setting."""


def _parse_host_port(text: str, loopback_only: bool) -> ListenAddress:
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d+)", text.strip())
    if not match:
        raise ValueError(f"expected host:port{' or unix:///path' if loopback_only else ''}, got {text!r}")
    host, port = match.group(1) or ("127.0.0.1" if loopback_only else "0.0.0.0"), int(match.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    if loopback_only:
        if host == "localhost":
            host = "127.0.0.1"
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(
                    f"the local API must listen on loopback or a Unix socket only (it is unauthenticated), got {host!r}"
                )
        except ValueError as exc:
            if "loopback" in str(exc):
                raise
            raise ValueError(f"expected a loopback IP address (127.0.0.1 or ::1), got {host!r}") from None
    return ListenAddress(host=host, port=port)


UNIX_PATH_MAX = 107
"""The longest Unix socket path, in bytes: the kernel's ``sockaddr_un.sun_path`` holds 108 with the NUL that
ends it. A longer one would fail only when gRPC binds it (``Path name should not have more than 107
characters``), after start-up; refused up front instead, naming the setting."""


def parse_grpc_listen(text: str) -> ListenAddress:
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"a Unix socket needs an absolute path (unix:///run/discovery.sock), got {text!r}")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ValueError(
                f"the Unix socket path is {len(os.fsencode(path))} bytes, longer than the kernel's limit of "
                f"{UNIX_PATH_MAX} (sun_path): put the socket in a shorter directory, e.g. unix:///run/discovery/"
                f"discovery.sock, got {text!r}"
            )
        return ListenAddress(unix_path=path)
    return _parse_host_port(text, loopback_only=True)


_BYTE_UNITS = {"": 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}


def parse_byte_size(text: str) -> int:
    """Bytes from ``"33554432"``, ``"32Mi"``, ``"500k"``, ``"1Gi"`` (Kubernetes quantity suffixes); at least 1 KiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?)?\s*", text)
    if not match:
        raise ValueError(f"expected a size such as 32Mi, 500Ki or 1Gi, got {text!r}")
    value = int(match.group(1)) * _BYTE_UNITS[(match.group(2) or "").lower()]
    if value < 1024:
        raise ValueError(f"expected at least 1Ki, got {text!r}")
    return value


def parse_relay_listen(text: str) -> ListenAddress:
    """Where a relay serves sidecars: ``host:port`` on any interface (it is authenticated, over TLS)."""
    return _parse_host_port(text, loopback_only=False)


def parse_upstream(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port`` (a DNS name with several addresses: a headless Service) or a comma-separated list."""
    targets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d+)", part)
        if not match:
            raise ValueError(f"expected host:port (e.g. discovery-relay.discovery.svc:50052), got {part!r}")
        port = int(match.group(2))
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        targets.append((match.group(1), port))
    if not targets:
        raise ValueError("expected at least one host:port")
    return tuple(targets)


def parse_pem_file(text: str) -> str:
    """A readable PEM file (a mounted Secret's key); its path."""
    path = pathlib.Path(text.strip())
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in content:
        raise ValueError(f"{path} is not a PEM file (no -----BEGIN line)")
    return str(path)


def parse_http_listen(text: str) -> ListenAddress | None:
    """The HTTP endpoint serves probes from the kubelet, so any interface is allowed; ``off`` disables it."""
    if text.strip().lower() in ("off", "none", "disabled"):
        return None
    return _parse_host_port(text, loopback_only=False)


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    problem = validate_worker_data(value)
    if problem is None and isinstance(value, dict):
        problem = dynamo_metadata_problem(value)  # what this pod publishes must be readable by Dynamo
    if problem:
        raise ValueError(problem.replace("spec.data", "the metadata"))
    assert isinstance(value, dict), "validate_worker_data accepts JSON objects only"
    return value


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` (env) or the downward-API ``labels`` file format (``k="v"`` per line)."""
    labels: dict[str, str] = {}
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        labels[key.strip()] = value
    try:
        selector_from_labels(labels)  # validates keys and values with Kubernetes' rules
    except SelectorError as exc:
        raise ValueError(str(exc)) from None
    return labels


COMMON_OPTIONS: tuple[Option, ...] = (
    Option(
        "POD_NAME",
        "--pod-name",
        "this pod's name (downward API metadata.name); also the CR's name (container mode: {pod}-{container})",
        podinfo_file="pod_name",
    ),
    Option(
        "POD_NAMESPACE",
        "--pod-namespace",
        "this pod's namespace (downward API metadata.namespace)",
        podinfo_file="pod_namespace",
    ),
    Option(
        "POD_UID", "--pod-uid", "this pod's UID (downward API metadata.uid); owner of the CR", podinfo_file="pod_uid"
    ),
    Option(
        "DISCOVERY_POD_LABELS",
        "--pod-labels",
        "labels to put on this pod's CR (peers filter on them), k=v,k2=v2; default: the downward-API "
        "labels file in the podinfo directory, if any",
        podinfo_file="labels",
    ),
    Option(
        "DISCOVERY_WATCH",
        "--watch",
        "auto: register at once, start watching peers on the first request for them; always: watch from "
        "start-up (routers, frontends); never: register only (peer requests are refused)",
        default="auto",
    ),
    Option(
        "DISCOVERY_GRPC_LISTEN",
        "--grpc-listen",
        "local API address: host:port on loopback, or unix:///path",
        default="127.0.0.1:50051",
    ),
    Option(
        "DISCOVERY_HTTP_LISTEN",
        "--http-listen",
        "health (/healthz, /readyz), /metrics and /debug/peers; host:port, or 'off'",
        default="0.0.0.0:8090",
    ),
    Option("DISCOVERY_METADATA", "--metadata", "initial spec.data of this pod's CR, as a JSON object"),
    Option(
        "DISCOVERY_METADATA_FILE", "--metadata-file", "initial spec.data read from a JSON file (instead of --metadata)"
    ),
    Option(
        "DYN_DISCOVERY_BACKEND",
        "--backend",
        "discovery backend, as Dynamo names it: kubernetes (CRs and EndpointSlices) or etcd (Dynamo's v1/ keys "
        "on a lease)",
        default="kubernetes",
    ),
    Option(
        "DISCOVERY_PODINFO_DIR",
        "--podinfo-dir",
        "downward-API volume read before the POD_* variables",
        default="/etc/podinfo",
    ),
    Option(
        "DISCOVERY_WATCH_SILENCE_TIMEOUT",
        "--watch-silence-timeout",
        "restart a watch that delivered nothing (not even a bookmark) for this long",
        default="90s",
    ),
    Option("DISCOVERY_REQUEST_TIMEOUT", "--request-timeout", "timeout of single API requests", default="15s"),
    Option(
        "DISCOVERY_BACKOFF_MAX",
        "--backoff-max",
        "longest wait between retries (jittered exponential backoff)",
        default="30s",
    ),
    Option(
        "DISCOVERY_HISTORY_SIZE",
        "--history-size",
        "changes kept for clients resuming by revision (also bounds a slow client's backlog)",
        default="10000",
    ),
    Option(
        "DISCOVERY_HISTORY_BYTES",
        "--history-bytes",
        "the most peer data that history may hold (e.g. 32Mi); the oldest changes go first",
        default="32Mi",
    ),
    Option(
        "DISCOVERY_DEBUG_PEERS",
        "--debug-peers",
        "who may read /debug/peers: loopback (this pod only), all, or off",
        default="loopback",
    ),
    Option(
        "DISCOVERY_REGISTRATION_RESYNC",
        "--registration-resync",
        "how often the registration is read back (and rewritten if it changed) without an event saying so; its own "
        "watch restores it at once",
        default="60s",
    ),
    Option(
        "DISCOVERY_SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        "on SIGTERM, the most time spent deregistering and closing streams",
        default="20s",
    ),
    Option(
        "DISCOVERY_REGISTER",
        "--register",
        "auto: register the pod, unless Dynamo's runtime (field manager dynamo-worker) manages its CR, then "
        "watch-only; never: watch-only (serve peers, write nothing)",
        default="auto",
    ),
    Option(
        "DISCOVERY_UPSTREAM",
        "--upstream",
        "follow a relay tier (discovery-sidecar relay) instead of watching the API server for peers: the relay "
        "Service as host:port (a DNS name with several addresses) or a comma-separated list of host:port; "
        "registration stays in the pod",
    ),
    Option(
        "DISCOVERY_UPSTREAM_CA",
        "--upstream-ca",
        "PEM bundle of the CA that verifies the relay's certificate (required with DISCOVERY_UPSTREAM)",
    ),
    Option(
        "DISCOVERY_RELAY_LISTEN",
        "--relay-listen",
        "discovery-sidecar relay: where it serves sidecars (TLS), host:port",
        default="0.0.0.0:50052",
    ),
    Option("DISCOVERY_RELAY_TLS_CERT", "--relay-tls-cert", "discovery-sidecar relay: its certificate chain (PEM path)"),
    Option("DISCOVERY_RELAY_TLS_KEY", "--relay-tls-key", "discovery-sidecar relay: its private key (PEM path)"),
    Option(
        "DISCOVERY_RELAY_ACCESS_TTL",
        "--relay-access-ttl",
        "discovery-sidecar relay: how long a client's TokenReview and SubjectAccessReviews are trusted before "
        "they are asked again (an open stream is then checked again, and ended if refused)",
        default="30s",
    ),
    Option("DISCOVERY_LOG_FORMAT", "--log-format", "auto (JSON unless on a terminal), json or console", default="auto"),
    Option("DISCOVERY_LOG_LEVEL", "--log-level", "debug, info, warning or error", default="info"),
)
OPTIONS: tuple[Option, ...] = COMMON_OPTIONS + tuple(o for table in OPTION_TABLES.values() for o in table)
"""Every option the sidecar reads: the common table, then each backend's."""
OPTIONS_BY_ENV = {o.env: o for o in OPTIONS}
_PODINFO_WINS = frozenset({"POD_NAME", "POD_NAMESPACE", "POD_UID"})
"""Options whose downward-API file wins over the environment variable (Dynamo reads these files first)."""


def _dest(option: Option) -> str:
    return option.flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        default = f" (default: {option.default})" if option.default else ""
        parser.add_argument(
            option.flag,
            dest=_dest(option),
            default=None,
            metavar=option.env,
            help=f"{option.help}{default}. Env: {option.env}",
        )


@dataclass(frozen=True)
class Settings:
    """Every validated setting of ``run``; built once by ``load_settings`` and only read after.

    The common settings, and the chosen backend's own record (``backend_settings``: a
    ``sidecar.kube.settings.KubeSettings`` or a ``sidecar.etcd.settings.EtcdSettings``), which only that
    backend reads. A ``sidecar.peers.backend.SharedSettings`` for the backends.
    """

    identity: PodIdentity
    pod_labels: Mapping[str, str]
    grpc_listen: ListenAddress
    http_listen: ListenAddress | None
    initial_metadata: Mapping[str, Any]
    watch_silence_timeout: float
    request_timeout: float
    backoff_max: float
    history_size: int
    history_bytes: int
    debug_peers: DebugPeers
    registration_resync: float  # seconds between read-backs of the registration without an event
    shutdown_timeout: float
    register: RegisterMode
    watch: WatchMode
    log_format: LogFormat
    log_level: LogLevel
    backend: BackendName
    backend_settings: BackendSettings
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)
    upstream: Upstream | None = None  # the relay followed for peers (DISCOVERY_UPSTREAM)

    @property
    def smg_manifest(self) -> SmgManifestSettings | None:
        """SMG's manifest, where the backend's peers have workers to list (the Kubernetes backend)."""
        return self.backend_settings.smg_manifest


class _Reader:
    """Resolves raw values with the precedence above and collects every problem before failing
    (``sidecar.peers.options.OptionReader``, for the common table and each backend's)."""

    def __init__(self, args: argparse.Namespace | None, environ: Mapping[str, str]) -> None:
        self.args = args
        self.environ = environ
        self.problems: list[str] = []
        self.raw: dict[str, str] = {}
        podinfo = self._lookup(OPTIONS_BY_ENV["DISCOVERY_PODINFO_DIR"])
        self.podinfo_dir = pathlib.Path(podinfo or "/etc/podinfo")

    def _lookup(self, option: Option) -> str | None:
        # add_arguments gives every option a plain string flag (no type=), unset being None
        value: str | None = getattr(self.args, _dest(option), None) if self.args is not None else None
        if value is not None:
            return value
        from_file = self._podinfo(option)
        if from_file is not None and option.env in _PODINFO_WINS:
            return from_file  # Dynamo's order for the pod identity: the downward-API file first
        value = self.environ.get(option.env)
        if value is not None and value.strip() != "":
            return value
        if from_file is not None:
            return from_file  # anything else (the labels file) is only a default
        return option.default

    def _podinfo(self, option: Option) -> str | None:
        if not option.podinfo_file or not hasattr(self, "podinfo_dir"):
            return None
        try:
            text = (self.podinfo_dir / option.podinfo_file).read_text().strip()
        except OSError:
            return None
        return text or None

    def where(self, env: str) -> str:
        option = OPTIONS_BY_ENV[env]
        return f"{option.env} ({option.flag})"

    @overload
    def get(self, env: str, *, required: str | None = None) -> str | None: ...

    @overload
    def get(self, env: str, parse: Callable[[str], _T], required: str | None = None) -> _T | None: ...

    def get(self, env: str, parse: Callable[[str], object] = str, required: str | None = None) -> object:
        """The parsed value, or None when it is unset or invalid (then the problem is recorded)."""
        option = OPTIONS_BY_ENV[env]
        text = self._lookup(option)
        if text is None:
            if required:
                self.problems.append(f"{self.where(env)} is not set: {required}")
            return None
        self.raw[env] = text
        try:
            return parse(text)
        except (ValueError, OSError) as exc:
            self.problems.append(f"{self.where(env)}: {exc}")
            return None


def _read_metadata_file(path: str) -> dict[str, Any]:
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return parse_json_object(text)


def load_settings(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve and validate every setting; raise ``ConfigError`` listing all problems."""
    reader = _Reader(args, os.environ if environ is None else environ)
    need_downward = "expose it with the downward API (fieldRef) or a podinfo volume"
    # An unknown backend is reported; the default backend's checks still run, so all is said at once.
    backend = reader.get("DYN_DISCOVERY_BACKEND", parse_choice(BackendName)) or BackendName.KUBERNETES
    name = reader.get("POD_NAME", required=f"the pod's name; {need_downward}")
    namespace = reader.get("POD_NAMESPACE", required=f"the pod's namespace; {need_downward}")
    uid = reader.get("POD_UID")  # required by the backends that own objects by it (Kubernetes)
    labels = reader.get("DISCOVERY_POD_LABELS", parse_labels) or {}
    identity = PodIdentity(name=name or "", namespace=namespace or "", uid=uid or "")
    upstream = _upstream(reader, backend)
    # Following a relay, the relay decides what defines readiness: this pod's readiness options are not needed.
    backend_settings = load_backend_settings(
        backend, reader, identity, follows_relay="DISCOVERY_UPSTREAM" in reader.raw
    )
    initial_metadata = _initial_metadata(reader)
    grpc_listen = reader.get("DISCOVERY_GRPC_LISTEN", parse_grpc_listen)
    http_listen = reader.get("DISCOVERY_HTTP_LISTEN", parse_http_listen)
    watch_silence_timeout = reader.get("DISCOVERY_WATCH_SILENCE_TIMEOUT", parse_duration)
    request_timeout = reader.get("DISCOVERY_REQUEST_TIMEOUT", parse_duration)
    backoff_max = reader.get("DISCOVERY_BACKOFF_MAX", parse_duration)
    history_size = reader.get("DISCOVERY_HISTORY_SIZE", parse_positive_int)
    history_bytes = reader.get("DISCOVERY_HISTORY_BYTES", parse_byte_size)
    debug_peers = reader.get("DISCOVERY_DEBUG_PEERS", parse_choice(DebugPeers))
    registration_resync = reader.get("DISCOVERY_REGISTRATION_RESYNC", parse_duration)
    shutdown_timeout = reader.get("DISCOVERY_SHUTDOWN_TIMEOUT", parse_duration)
    register = reader.get("DISCOVERY_REGISTER", parse_choice(RegisterMode))
    watch = reader.get("DISCOVERY_WATCH", parse_choice(WatchMode))
    log_format = reader.get("DISCOVERY_LOG_FORMAT", parse_choice(LogFormat))
    log_level = reader.get("DISCOVERY_LOG_LEVEL", parse_choice(LogLevel))
    if backend_settings is not None and backend_settings.smg_manifest is not None and watch is WatchMode.NEVER:
        reader.problems.append(
            f"{reader.where('DISCOVERY_SMG_MANIFEST')} lists peers, but {reader.where('DISCOVERY_WATCH')} is "
            "'never' (no peers are watched): use auto or always"
        )
    if reader.problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(reader.problems))
    # No problems, so every required setting was given and every one with a default parsed.
    assert backend_settings is not None, "a backend loader returns None only with a problem recorded"
    return Settings(
        upstream=upstream,
        identity=identity,
        pod_labels=labels,
        grpc_listen=known(grpc_listen),
        http_listen=http_listen,
        initial_metadata=initial_metadata,
        watch_silence_timeout=known(watch_silence_timeout),
        request_timeout=known(request_timeout),
        backoff_max=known(backoff_max),
        history_size=known(history_size),
        history_bytes=known(history_bytes),
        debug_peers=known(debug_peers),
        registration_resync=known(registration_resync),
        shutdown_timeout=known(shutdown_timeout),
        register=known(register),
        watch=known(watch),
        log_format=known(log_format),
        log_level=known(log_level),
        backend=backend,
        backend_settings=backend_settings,
        raw=reader.raw,
    )


def _upstream(reader: _Reader, backend: BackendName) -> Upstream | None:
    targets = reader.get("DISCOVERY_UPSTREAM", parse_upstream)
    ca = reader.get("DISCOVERY_UPSTREAM_CA", parse_pem_file)
    if "DISCOVERY_UPSTREAM" not in reader.raw:
        if "DISCOVERY_UPSTREAM_CA" in reader.raw:
            reader.problems.append(
                f"{reader.where('DISCOVERY_UPSTREAM_CA')} is set but {reader.where('DISCOVERY_UPSTREAM')} (the relay "
                "to follow) is not"
            )
        return None
    if backend is not BackendName.KUBERNETES:
        reader.problems.append(
            f"{reader.where('DISCOVERY_UPSTREAM')}: a relay serves Kubernetes peers; "
            f"{reader.where('DYN_DISCOVERY_BACKEND')} is {backend.value!r}"
        )
    if "DISCOVERY_UPSTREAM_CA" not in reader.raw:
        reader.problems.append(
            f"{reader.where('DISCOVERY_UPSTREAM_CA')} is not set: the CA bundle that verifies the relay's certificate "
            "(the ca.crt of its TLS Secret, or the cluster's CA bundle)"
        )
    if targets is None or ca is None:
        return None
    return Upstream(targets=targets, ca_file=ca)


@dataclass(frozen=True)
class RelaySettings:
    """Every validated setting of ``discovery-sidecar relay``: what it watches (the Kubernetes table, read
    as a sidecar reads it), where and how it serves, and how long a client's access is trusted."""

    namespace: str  # its own (the default of DISCOVERY_NAMESPACES)
    kube: BackendSettings  # a sidecar.kube.settings.KubeSettings
    listen: ListenAddress
    tls: TlsFiles
    access_ttl: float
    http_listen: ListenAddress | None
    watch_silence_timeout: float
    request_timeout: float
    backoff_max: float
    history_size: int
    history_bytes: int
    debug_peers: DebugPeers
    shutdown_timeout: float
    log_format: LogFormat
    log_level: LogLevel
    # What a relay never does (SharedSettings for the backend's watches): it registers nothing.
    identity: PodIdentity = PodIdentity("", "", "")
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    initial_metadata: Mapping[str, Any] = field(default_factory=dict)
    register: RegisterMode = RegisterMode.NEVER
    registration_resync: float = 60.0
    upstream: Upstream | None = None


def load_relay_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> RelaySettings:
    """Resolve and validate the relay's settings; raise ``ConfigError`` listing all problems."""
    reader = _Reader(args, os.environ if environ is None else environ)
    namespace = reader.get("POD_NAMESPACE") or ""
    if not namespace and not (reader.get("DISCOVERY_NAMESPACES") or "").strip():
        reader.problems.append(
            f"set {reader.where('DISCOVERY_NAMESPACES')} (where peers are watched) or "
            f"{reader.where('POD_NAMESPACE')} (the relay's own namespace, its default)"
        )
    kube = load_backend_settings(BackendName.KUBERNETES, reader, PodIdentity("", namespace, ""), registers=False)
    listen = reader.get("DISCOVERY_RELAY_LISTEN", parse_relay_listen)
    cert = reader.get("DISCOVERY_RELAY_TLS_CERT", parse_pem_file, required="the relay's certificate (PEM path)")
    key = reader.get("DISCOVERY_RELAY_TLS_KEY", parse_pem_file, required="the relay's private key (PEM path)")
    access_ttl = reader.get("DISCOVERY_RELAY_ACCESS_TTL", parse_duration)
    http_listen = reader.get("DISCOVERY_HTTP_LISTEN", parse_http_listen)
    watch_silence_timeout = reader.get("DISCOVERY_WATCH_SILENCE_TIMEOUT", parse_duration)
    request_timeout = reader.get("DISCOVERY_REQUEST_TIMEOUT", parse_duration)
    backoff_max = reader.get("DISCOVERY_BACKOFF_MAX", parse_duration)
    history_size = reader.get("DISCOVERY_HISTORY_SIZE", parse_positive_int)
    history_bytes = reader.get("DISCOVERY_HISTORY_BYTES", parse_byte_size)
    debug_peers = reader.get("DISCOVERY_DEBUG_PEERS", parse_choice(DebugPeers))
    shutdown_timeout = reader.get("DISCOVERY_SHUTDOWN_TIMEOUT", parse_duration)
    log_format = reader.get("DISCOVERY_LOG_FORMAT", parse_choice(LogFormat))
    log_level = reader.get("DISCOVERY_LOG_LEVEL", parse_choice(LogLevel))
    if kube is not None and kube.smg_manifest is not None:
        reader.problems.append(f"{reader.where('DISCOVERY_SMG_MANIFEST')} is a sidecar's: a relay writes no manifest")
    if reader.problems:
        raise ConfigError("invalid relay configuration:\n  - " + "\n  - ".join(reader.problems))
    assert kube is not None, "a backend loader returns None only with a problem recorded"
    return RelaySettings(
        namespace=namespace,
        kube=kube,
        listen=known(listen),
        tls=TlsFiles(cert=known(cert), key=known(key)),
        access_ttl=known(access_ttl),
        http_listen=http_listen,
        watch_silence_timeout=known(watch_silence_timeout),
        request_timeout=known(request_timeout),
        backoff_max=known(backoff_max),
        history_size=known(history_size),
        history_bytes=known(history_bytes),
        debug_peers=known(debug_peers),
        shutdown_timeout=known(shutdown_timeout),
        log_format=known(log_format),
        log_level=known(log_level),
    )


def _initial_metadata(reader: _Reader) -> Mapping[str, Any]:
    inline = reader.get("DISCOVERY_METADATA", parse_json_object)
    from_file = reader.get("DISCOVERY_METADATA_FILE", _read_metadata_file)
    if "DISCOVERY_METADATA" in reader.raw and "DISCOVERY_METADATA_FILE" in reader.raw:
        reader.problems.append(
            f"set only one of {reader.where('DISCOVERY_METADATA')} and {reader.where('DISCOVERY_METADATA_FILE')}"
        )
    return inline if inline is not None else (from_file if from_file is not None else {})
