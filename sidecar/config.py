"""Configuration: downward-API identity and ``DISCOVERY_*`` settings, each with a matching CLI flag.

Environment variables are the pod spec's natural language, so they are the contract; flags mirror them
for local runs. One table (``OPTIONS``) drives the parser, ``--help`` and the README, so the three
cannot drift. Precedence: flag, then environment, then default; for the pod identity Dynamo's order is
kept (a downward-API file in ``/etc/podinfo`` wins over the environment variable), so a pod configured
for Dynamo configures the sidecar the same way.

Every problem is reported as a ``ConfigError`` naming the variable, the flag, what was expected and
what was found, and all problems are reported at once, so a broken pod spec is fixed in one go.
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

from sidecar.core.containers import DEFAULT_MAIN_CONTAINER, metadata_name
from sidecar.core.dynamo_schema import dynamo_metadata_problem
from sidecar.core.resources import validate_worker_data
from sidecar.core.selectors import (
    EVERYTHING,
    LabelSelector,
    SelectorError,
    parse_selector,
    selector_from_labels,
)
from sidecar.core.smg_manifest import SmgRoles, parse_smg_selector
from sidecar.core.workers import PROTOCOLS, ModelIdFrom, WorkerPolicy
from sidecar.etcd.settings import (
    CA_ENV,
    CLIENT_CERT_ENV,
    CLIENT_KEY_ENV,
    DEFAULT_ENDPOINTS,
    DEFAULT_LEASE_TTL,
    DEFAULT_STARTUP_CONNECT_TIMEOUT,
    ENDPOINTS_ENV,
    LEASE_TTL_ENV,
    PASSWORD_ENV,
    STARTUP_TIMEOUT_ENV,
    USERNAME_ENV,
    EtcdSettings,
    EtcdSettingsError,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONTAINER_MODE_POD_SELECTOR = "nvidia.com/dynamo-discovery-enabled=true"
"""The Pods Dynamo's container mode watches (the label its operator puts on discoverable workloads)."""

_T = TypeVar("_T")


class ConfigError(ValueError):
    """Start-up cannot proceed; the message lists every bad setting."""


@dataclass(frozen=True)
class ListenAddress:
    """Where a server listens: ``host:port`` on loopback (or any interface when allowed) or a Unix socket."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def grpc_target(self) -> str:
        if self.unix_path:
            return f"unix://{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def bind_target(self) -> str:
        """What a gRPC server listens on: ``unix:/path`` for a socket, since the server strips only ``unix:``
        and counts the rest against the path limit (``unix:///path`` would cost two of its bytes)."""
        return f"unix:{self.unix_path}" if self.unix_path else self.grpc_target

    def __str__(self) -> str:
        return self.grpc_target


def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``; must be positive."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 500ms or 2m, got {text!r}")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if value <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a number of at least 1, got {value}")
    return value


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


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_port(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise ValueError(f"expected a port in 1-65535, got {value}")
    return value


def parse_manifest_path(text: str) -> pathlib.Path:
    """Where SMG's manifest is written: an absolute path in an existing directory (the shared volume),
    since the file is replaced by renaming a temporary file in that same directory."""
    path = pathlib.Path(text.strip())
    if not path.is_absolute() or not path.name:
        raise ValueError(f"expected an absolute file path (e.g. /shared/workers.json), got {text!r}")
    if not path.parent.is_dir():
        raise ValueError(f"directory {path.parent} does not exist: mount the volume SMG reads (an emptyDir) there")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the manifest's file name")
    return path


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


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_namespaces(text: str) -> tuple[str, ...]:
    """``*`` (all namespaces, as ``("",)``), or a comma-separated list of namespace names; empty: own."""
    value = text.strip()
    if value == "*":
        return ("",)
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    for name in names:
        if not _DNS_LABEL.fullmatch(name):
            raise ValueError(f"{name!r} is not a namespace name (lowercase letters, digits and '-', at most 63)")
    return names


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


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, its flag, how to parse it and what it means."""

    env: str
    flag: str
    help: str
    default: str | None = None
    podinfo_file: str | None = None  # read from the downward-API volume first (Dynamo's order)


OPTIONS: tuple[Option, ...] = (
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
        "DISCOVERY_SERVICE_NAME",
        "--service-name",
        "the Service whose EndpointSlices define peer readiness (label kubernetes.io/service-name)",
    ),
    Option(
        "DISCOVERY_ENDPOINTSLICE_SELECTOR",
        "--endpointslice-selector",
        "label selector for the EndpointSlices to watch; combined (AND) with --service-name when both are set",
    ),
    Option(
        "DISCOVERY_POD_SELECTOR",
        "--pod-selector",
        "label selector over Pods: Pods become the readiness source (Ready, Running, with an IP), no Service needed",
    ),
    Option(
        "DYN_KUBE_DISCOVERY_MODE",
        "--kube-discovery-mode",
        "Dynamo's pod (one instance per pod) or container mode (each registering container is an instance: "
        "CR {pod}-{container} except the main container, readiness from containerStatuses)",
        default="pod",
    ),
    Option(
        "CONTAINER_NAME",
        "--container-name",
        "container mode: the container this sidecar registers (required in container mode)",
    ),
    Option(
        "DYN_MAIN_CONTAINER_NAME",
        "--main-container-name",
        "container mode: this pod's main container, which keeps the pod's identity (Dynamo 1.6.1 knows only 'main')",
        default="main",
    ),
    Option(
        "DISCOVERY_WATCH",
        "--watch",
        "auto: register at once, start watching peers on the first request for them; always: watch from "
        "start-up (routers, frontends); never: register only (peer requests are refused)",
        default="auto",
    ),
    Option(
        "DISCOVERY_INITIAL_LIST",
        "--initial-list",
        "how a watch gets its initial state: stream (a watch with sendInitialEvents, served from the API "
        "server's cache; paginated LIST where the server refuses it) or pages (paginated LIST)",
        default="stream",
    ),
    Option(
        "DISCOVERY_PEER_SELECTOR",
        "--peer-selector",
        "a label selector over peers' labels that this pod can ever want; sent to the API server, so other "
        "peers' objects are never transmitted (clients' own filters still apply on top)",
    ),
    Option(
        "DISCOVERY_NAMESPACES",
        "--namespaces",
        "where peers are watched: empty for the pod's own namespace, a comma-separated list, or * for all",
    ),
    Option(
        "DISCOVERY_REQUIRE_METADATA",
        "--require-metadata",
        "true: a peer must have published its metadata (a CR owned by the pod); false: any ready pod is a "
        "peer, with its own labels and no data when it has no CR (pods that run no sidecar)",
        default="true",
    ),
    Option(
        "DISCOVERY_WORKER_PORT",
        "--worker-port",
        "a peer's serving port, unless its pod's smg.ai/worker-ports annotation lists its ports "
        "(unset: the one port the pod or its EndpointSlice declares)",
    ),
    Option(
        "DISCOVERY_WORKER_PROTOCOL",
        "--worker-protocol",
        "the scheme of the peers' worker URLs: http or grpc",
        default="http",
    ),
    Option(
        "DISCOVERY_MODEL_ID_FROM",
        "--model-id-from",
        "a worker's model id: namespace, label:<key> or annotation:<key> of its pod (as smg --model-id-from)",
    ),
    Option(
        "DISCOVERY_SMG_MANIFEST",
        "--smg-manifest",
        "write SGLang Model Gateway's worker manifest (smg --discovery-provider file) to this path",
    ),
    Option(
        "DISCOVERY_SMG_SELECTOR",
        "--smg-selector",
        "peers listed in the SMG manifest as regular workers (as smg --selector; k=v k2=v2 also accepted)",
    ),
    Option(
        "DISCOVERY_SMG_PREFILL_SELECTOR",
        "--smg-prefill-selector",
        "peers listed as prefill workers, with their bootstrap port (as smg --prefill-selector)",
    ),
    Option(
        "DISCOVERY_SMG_DECODE_SELECTOR",
        "--smg-decode-selector",
        "peers listed as decode workers (as smg --decode-selector)",
    ),
    Option(
        "DISCOVERY_SMG_ENCODE_SELECTOR",
        "--smg-encode-selector",
        "peers listed as encode workers, with their bootstrap port (as smg --encode-selector); roles are "
        "tried in SMG's order encode, prefill, decode, then regular",
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
        ENDPOINTS_ENV,
        "--etcd-endpoints",
        "etcd backend: comma-separated client URLs (https:// for TLS)",
        default=DEFAULT_ENDPOINTS,
    ),
    Option(
        LEASE_TTL_ENV,
        "--etcd-lease-ttl",
        "etcd backend: TTL of this instance's lease in whole seconds (renewed every TTL/2)",
        default=str(DEFAULT_LEASE_TTL),
    ),
    Option(
        STARTUP_TIMEOUT_ENV,
        "--etcd-startup-connect-timeout",
        "etcd backend: whole seconds to wait for etcd at start-up before giving up (exit 1)",
        default=str(int(DEFAULT_STARTUP_CONNECT_TIMEOUT)),
    ),
    Option(USERNAME_ENV, "--etcd-auth-username", "etcd backend: user name (with the password)"),
    Option(PASSWORD_ENV, "--etcd-auth-password", "etcd backend: password (with the user name)"),
    Option(CA_ENV, "--etcd-auth-ca", "etcd backend: CA certificate, PEM text (as Dynamo reads it) or a PEM file"),
    Option(
        CLIENT_CERT_ENV,
        "--etcd-auth-client-cert",
        "etcd backend: client certificate, PEM text or a PEM file (with the key)",
    ),
    Option(CLIENT_KEY_ENV, "--etcd-auth-client-key", "etcd backend: client key, PEM text or a PEM file"),
    Option("KUBECONFIG", "--kubeconfig", "kubeconfig to use outside a cluster (in a pod: the service account)"),
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
        "DISCOVERY_FIELD_MANAGER", "--field-manager", "server-side apply field manager", default="discovery-sidecar"
    ),
    Option(
        "DISCOVERY_REGISTER",
        "--register",
        "auto: register the pod, unless Dynamo's runtime (field manager dynamo-worker) manages its CR, then "
        "watch-only; never: watch-only (serve peers, write nothing)",
        default="auto",
    ),
    Option("DISCOVERY_LOG_FORMAT", "--log-format", "auto (JSON unless on a terminal), json or console", default="auto"),
    Option("DISCOVERY_LOG_LEVEL", "--log-level", "debug, info, warning or error", default="info"),
)
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
class PodIdentity:
    """Which pod incarnation this sidecar speaks for (downward API or /etc/podinfo)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class SmgManifestSettings:
    """Where SMG's worker manifest goes and which peers it lists in which role."""

    path: pathlib.Path
    roles: SmgRoles


@dataclass(frozen=True)
class Settings:
    """Every validated setting of ``run``; built once by ``load_settings`` and only read after."""

    identity: PodIdentity
    pod_labels: Mapping[str, str]
    endpointslice_selector: LabelSelector | None  # None when Pods define readiness
    pod_selector: LabelSelector | None
    namespaces: tuple[str, ...]  # where peers are watched; ("",) is every namespace
    require_metadata: bool
    workers: WorkerPolicy
    smg_manifest: SmgManifestSettings | None
    grpc_listen: ListenAddress
    http_listen: ListenAddress | None
    initial_metadata: Mapping[str, Any]
    kubeconfig: str | None
    watch_silence_timeout: float
    request_timeout: float
    backoff_max: float
    history_size: int
    history_bytes: int
    debug_peers: str
    shutdown_timeout: float
    field_manager: str
    register: str
    watch: str  # auto (on the first peer request), always, never
    container_mode: bool  # Dynamo's container mode: Pods' containerStatuses are the readiness source
    container_name: str  # container mode: the container registered ("" in pod mode)
    metadata_name: str  # this pod's (or container's) DynamoWorkerMetadata name: the pod's, or {pod}-{container}
    log_format: str
    log_level: str
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)
    backend: str = "kubernetes"  # or "etcd"
    etcd: EtcdSettings | None = None  # set on the etcd backend only
    streaming_list: bool = True  # Kubernetes: initial state by a sendInitialEvents watch (else paginated LIST)
    peer_selector: LabelSelector | None = (
        None  # Kubernetes: peers' labels this pod can ever want, sent to the API server
    )
    registration_resync: float = 60.0  # seconds between read-backs of the registration without an event

    @property
    def uses_etcd(self) -> bool:
        return self.backend == "etcd"


class _Reader:
    """Resolves raw values and collects every problem before failing."""

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
    backend = reader.get("DYN_DISCOVERY_BACKEND", _choice("kubernetes", "etcd"))
    on_etcd = backend == "etcd"
    name = reader.get("POD_NAME", required=f"the pod's name; {need_downward}")
    namespace = reader.get("POD_NAMESPACE", required=f"the pod's namespace; {need_downward}")
    # On etcd nothing is owned by the Pod and peers are not joined on UIDs: the UID is only reported.
    uid = reader.get("POD_UID", required=None if on_etcd else f"the pod's UID; {need_downward}")
    labels = reader.get("DISCOVERY_POD_LABELS", parse_labels) or {}
    if on_etcd:
        return _load_etcd_settings(reader, name, namespace, uid, labels)

    service = reader.get("DISCOVERY_SERVICE_NAME")
    slice_selector = reader.get("DISCOVERY_ENDPOINTSLICE_SELECTOR", _parse_selector_value)
    selector = EVERYTHING
    if service:
        try:
            selector = selector.and_(selector_from_labels({SERVICE_NAME_LABEL: service}))
        except SelectorError as exc:
            reader.problems.append(f"{reader.where('DISCOVERY_SERVICE_NAME')}: not a valid Service name: {exc}")
    if isinstance(slice_selector, LabelSelector):
        selector = selector.and_(slice_selector)
    pod_selector = reader.get("DISCOVERY_POD_SELECTOR", _parse_selector_value)
    wants_slices = bool(service) or "DISCOVERY_ENDPOINTSLICE_SELECTOR" in reader.raw
    mode = reader.get("DYN_KUBE_DISCOVERY_MODE", _choice("pod", "container"))
    container = (reader.get("CONTAINER_NAME") or "").strip()
    main_container = (reader.get("DYN_MAIN_CONTAINER_NAME") or "").strip() or DEFAULT_MAIN_CONTAINER
    if mode == "container":
        if not container:
            reader.problems.append(
                f"{reader.where('CONTAINER_NAME')} is not set: required when "
                f"{reader.where('DYN_KUBE_DISCOVERY_MODE')} is 'container' (the container this sidecar registers)"
            )
        if wants_slices:
            reader.problems.append(
                f"{reader.where('DYN_KUBE_DISCOVERY_MODE')} is 'container': readiness comes from the Pods' "
                f"containerStatuses, so {reader.where('DISCOVERY_SERVICE_NAME')}/"
                f"{reader.where('DISCOVERY_ENDPOINTSLICE_SELECTOR')} do not apply; select the Pods with "
                f"{reader.where('DISCOVERY_POD_SELECTOR')} (default: {CONTAINER_MODE_POD_SELECTOR}, as Dynamo does)"
            )
        if "DISCOVERY_POD_SELECTOR" not in reader.raw:
            pod_selector = parse_selector(CONTAINER_MODE_POD_SELECTOR)
        elif isinstance(pod_selector, LabelSelector) and pod_selector.is_empty():
            reader.problems.append(
                f"{reader.where('DISCOVERY_POD_SELECTOR')} selects every Pod; give a non-empty selector"
            )
    elif "DISCOVERY_POD_SELECTOR" in reader.raw:
        if wants_slices:
            reader.problems.append(
                f"set either {reader.where('DISCOVERY_POD_SELECTOR')} (Pods define readiness) or "
                f"{reader.where('DISCOVERY_SERVICE_NAME')}/{reader.where('DISCOVERY_ENDPOINTSLICE_SELECTOR')} "
                "(EndpointSlices do), not both"
            )
        elif isinstance(pod_selector, LabelSelector) and pod_selector.is_empty():
            reader.problems.append(
                f"{reader.where('DISCOVERY_POD_SELECTOR')} selects every Pod; give a non-empty selector"
            )
    elif not wants_slices:
        reader.problems.append(
            f"set {reader.where('DISCOVERY_SERVICE_NAME')}, {reader.where('DISCOVERY_ENDPOINTSLICE_SELECTOR')} "
            f"or {reader.where('DISCOVERY_POD_SELECTOR')}: they say what defines peer readiness"
        )
    elif selector.is_empty() and not reader.problems:
        reader.problems.append(
            f"{reader.where('DISCOVERY_ENDPOINTSLICE_SELECTOR')} selects every EndpointSlice in the namespace; "
            "give a non-empty selector"
        )

    namespaces = reader.get("DISCOVERY_NAMESPACES", parse_namespaces)
    require_metadata = reader.get("DISCOVERY_REQUIRE_METADATA", parse_bool)
    worker_port = reader.get("DISCOVERY_WORKER_PORT", parse_port)
    worker_protocol = reader.get("DISCOVERY_WORKER_PROTOCOL", _choice(*PROTOCOLS))
    model_id_from = reader.get("DISCOVERY_MODEL_ID_FROM", ModelIdFrom.parse)
    smg_manifest = _smg_manifest_settings(reader)
    if smg_manifest is not None and reader.raw.get("DISCOVERY_WATCH", "").strip().lower() == "never":
        reader.problems.append(
            f"{reader.where('DISCOVERY_SMG_MANIFEST')} lists peers, but {reader.where('DISCOVERY_WATCH')} is "
            "'never' (no peers are watched): use auto or always"
        )
    initial_list = reader.get("DISCOVERY_INITIAL_LIST", _choice("stream", "pages"))
    peer_selector = reader.get("DISCOVERY_PEER_SELECTOR", _parse_selector_value)
    initial_metadata = _initial_metadata(reader)
    common = _common_settings(reader)
    if reader.problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(reader.problems))
    # No problems, so every required setting was given and every one with a default parsed.
    return Settings(
        identity=PodIdentity(name=_known(name), namespace=_known(namespace), uid=_known(uid)),
        pod_labels=labels,
        endpointslice_selector=None if isinstance(pod_selector, LabelSelector) else selector,
        pod_selector=pod_selector if isinstance(pod_selector, LabelSelector) else None,
        namespaces=namespaces or (_known(namespace),),
        require_metadata=_known(require_metadata),
        workers=WorkerPolicy(port=worker_port, protocol=_known(worker_protocol), model_id_from=model_id_from),
        smg_manifest=smg_manifest,
        initial_metadata=initial_metadata,
        raw=reader.raw,
        container_mode=mode == "container",
        container_name=container,
        metadata_name=metadata_name(_known(name), container, main_container) if mode == "container" else _known(name),
        streaming_list=initial_list == "stream",
        peer_selector=peer_selector
        if isinstance(peer_selector, LabelSelector) and not peer_selector.is_empty()
        else None,
        **common,
    )


_ETCD_ONLY = (
    ENDPOINTS_ENV,
    LEASE_TTL_ENV,
    STARTUP_TIMEOUT_ENV,
    USERNAME_ENV,
    PASSWORD_ENV,
    CA_ENV,
    CLIENT_CERT_ENV,
    CLIENT_KEY_ENV,
)
_KUBERNETES_ONLY = (
    "DISCOVERY_SERVICE_NAME",
    "DISCOVERY_ENDPOINTSLICE_SELECTOR",
    "DISCOVERY_POD_SELECTOR",
    "DISCOVERY_NAMESPACES",
    "DISCOVERY_PEER_SELECTOR",
)
"""Settings that choose Kubernetes objects: on etcd they would silently mean nothing, so they are refused."""


def _load_etcd_settings(
    reader: _Reader, name: str | None, namespace: str | None, uid: str | None, labels: Mapping[str, str]
) -> Settings:
    """The etcd backend: peers are Dynamo's ``v1/`` keys, registration is a lease; no Service, no UID."""
    for env in _KUBERNETES_ONLY:
        if reader.get(env) is not None:
            reader.problems.append(
                f"{reader.where(env)} chooses Kubernetes objects, but {reader.where('DYN_DISCOVERY_BACKEND')} is "
                "etcd, where every instance under etcd's v1/ keys is a peer: unset it"
            )
    ttl = reader.get(LEASE_TTL_ENV, parse_positive_int)
    startup = reader.get(STARTUP_TIMEOUT_ENV, parse_positive_int)
    values = {env: reader.get(env) for env in _ETCD_ONLY if env not in (LEASE_TTL_ENV, STARTUP_TIMEOUT_ENV)}
    values[LEASE_TTL_ENV] = None if ttl is None else str(ttl)  # already reported when unusable
    values[STARTUP_TIMEOUT_ENV] = None if startup is None else str(startup)
    etcd: EtcdSettings | None = None
    try:
        etcd, warnings = EtcdSettings.from_env({k: v for k, v in values.items() if v is not None})
    except EtcdSettingsError as exc:
        warnings = exc.problems
    # Dynamo logs these and goes on without the setting; the sidecar refuses to start on them instead,
    # so a half-configured TLS or login is never silently dropped.
    reader.problems.extend(_name_flags(reader, warning) for warning in warnings)
    initial_metadata = _initial_metadata(reader)
    common = _common_settings(reader)
    if reader.problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(reader.problems))
    return Settings(
        identity=PodIdentity(name=_known(name), namespace=_known(namespace), uid=uid or ""),
        pod_labels=labels,
        endpointslice_selector=None,
        pod_selector=None,
        namespaces=(),
        initial_metadata=initial_metadata,
        raw=reader.raw,
        backend="etcd",
        etcd=etcd,
        container_mode=False,  # on etcd a process is its lease: no pod, no container to name
        container_name="",
        metadata_name=_known(name),
        require_metadata=True,  # on etcd a peer is its keys: there is no pod without metadata
        workers=WorkerPolicy(),
        smg_manifest=None,
        **common,
    )


def _name_flags(reader: _Reader, sentence: str) -> str:
    """``sentence`` with each etcd variable it names followed by its flag, once."""
    for env in _ETCD_ONLY:
        sentence = re.sub(rf"\b{env}\b(?! \()", reader.where(env), sentence, count=1)
    return sentence


def _initial_metadata(reader: _Reader) -> Mapping[str, Any]:
    inline = reader.get("DISCOVERY_METADATA", parse_json_object)
    from_file = reader.get("DISCOVERY_METADATA_FILE", _read_metadata_file)
    if "DISCOVERY_METADATA" in reader.raw and "DISCOVERY_METADATA_FILE" in reader.raw:
        reader.problems.append(
            f"set only one of {reader.where('DISCOVERY_METADATA')} and {reader.where('DISCOVERY_METADATA_FILE')}"
        )
    return inline if inline is not None else (from_file if from_file is not None else {})


def _common_settings(reader: _Reader) -> dict[str, Any]:
    """The settings both backends share, as ``Settings`` keyword arguments (None where a problem was recorded)."""
    grpc_listen = reader.get("DISCOVERY_GRPC_LISTEN", parse_grpc_listen)
    http_listen = reader.get("DISCOVERY_HTTP_LISTEN", parse_http_listen)
    kubeconfig = reader.get("KUBECONFIG")
    watch_silence_timeout = reader.get("DISCOVERY_WATCH_SILENCE_TIMEOUT", parse_duration)
    request_timeout = reader.get("DISCOVERY_REQUEST_TIMEOUT", parse_duration)
    backoff_max = reader.get("DISCOVERY_BACKOFF_MAX", parse_duration)
    history_size = reader.get("DISCOVERY_HISTORY_SIZE", parse_positive_int)
    history_bytes = reader.get("DISCOVERY_HISTORY_BYTES", parse_byte_size)
    debug_peers = reader.get("DISCOVERY_DEBUG_PEERS", _choice("loopback", "all", "off"))
    shutdown_timeout = reader.get("DISCOVERY_SHUTDOWN_TIMEOUT", parse_duration)
    registration_resync = reader.get("DISCOVERY_REGISTRATION_RESYNC", parse_duration)
    field_manager = reader.get("DISCOVERY_FIELD_MANAGER")
    register = reader.get("DISCOVERY_REGISTER", _choice("auto", "never"))
    watch = reader.get("DISCOVERY_WATCH", _choice("auto", "always", "never"))
    log_format = reader.get("DISCOVERY_LOG_FORMAT", _choice("auto", "json", "console"))
    log_level = reader.get("DISCOVERY_LOG_LEVEL", _choice("debug", "info", "warning", "error"))
    return {
        "grpc_listen": grpc_listen,
        "http_listen": http_listen,
        "kubeconfig": kubeconfig,
        "watch_silence_timeout": watch_silence_timeout,
        "request_timeout": request_timeout,
        "backoff_max": backoff_max,
        "history_size": history_size,
        "history_bytes": history_bytes,
        "debug_peers": debug_peers,
        "shutdown_timeout": shutdown_timeout,
        "registration_resync": registration_resync,
        "field_manager": field_manager,
        "register": register,
        "watch": watch,
        "log_format": log_format,
        "log_level": log_level,
    }


SMG_ROLE_OPTIONS = {
    "regular": "DISCOVERY_SMG_SELECTOR",
    "prefill": "DISCOVERY_SMG_PREFILL_SELECTOR",
    "decode": "DISCOVERY_SMG_DECODE_SELECTOR",
    "encode": "DISCOVERY_SMG_ENCODE_SELECTOR",
}


def _smg_selector_value(text: str) -> LabelSelector:
    try:
        selector = parse_smg_selector(text)
    except SelectorError as exc:
        raise ValueError(f"invalid label selector: {exc}") from None
    if selector.is_empty():
        raise ValueError("an empty selector would list every peer; give a non-empty one")
    return selector


def _smg_manifest_settings(reader: _Reader) -> SmgManifestSettings | None:
    """The manifest path and its role selectors: all or nothing, so a half-configured gateway is an error."""
    path = reader.get("DISCOVERY_SMG_MANIFEST", parse_manifest_path)
    selectors = {role: reader.get(env, _smg_selector_value) for role, env in SMG_ROLE_OPTIONS.items()}
    given = [env for env in SMG_ROLE_OPTIONS.values() if env in reader.raw]
    if "DISCOVERY_SMG_MANIFEST" not in reader.raw:
        if given:
            reader.problems.append(
                f"{', '.join(reader.where(env) for env in given)} select peers for SMG's manifest, but "
                f"{reader.where('DISCOVERY_SMG_MANIFEST')} (where to write it) is not set"
            )
        return None
    if not given:
        reader.problems.append(
            f"{reader.where('DISCOVERY_SMG_MANIFEST')} is set but no peers are selected for it: set "
            f"{reader.where('DISCOVERY_SMG_SELECTOR')} (regular workers) or the prefill/decode/encode selectors"
        )
    if path is None:
        return None
    return SmgManifestSettings(path, SmgRoles(**selectors))


def _known(value: _T | None) -> _T:
    """A setting that is required or has a default: ``_Reader.get`` gave None only with a problem recorded."""
    assert value is not None, "a missing setting must have been reported as a problem"
    return value


def _parse_selector_value(text: str) -> LabelSelector:
    try:
        return parse_selector(text)
    except SelectorError as exc:
        raise ValueError(f"invalid label selector: {exc}") from None


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return value

    return parse
