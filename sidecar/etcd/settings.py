"""How to reach etcd, from Dynamo's environment variables, read the way Dynamo reads them.

Dynamo's runtime (``lib/runtime/src/transports/etcd.rs``, ``ClientOptions::default``) reads:

* ``ETCD_ENDPOINTS``: comma-separated URLs, default ``http://localhost:2379``.
* ``ETCD_AUTH_USERNAME`` + ``ETCD_AUTH_PASSWORD``: both set, or neither is used.
* ``ETCD_AUTH_CA`` + ``ETCD_AUTH_CLIENT_CERT`` + ``ETCD_AUTH_CLIENT_KEY``: all three set, or none is used.
  The values go to ``Certificate::from_pem`` / ``Identity::from_pem``: they are the **PEM text**, not
  paths (the constants' doc comments say "path", the code passes the text). Here PEM text is read as
  Dynamo reads it, and a value that is not PEM but names a readable file is read from that file.
* ``ETCD_LEASE_TTL``: seconds, a positive integer; anything else is logged and the default is used: 30 s
  in the released runtime 1.6.1 (measured: its workers' leases are granted 30 s; 10 s is set explicitly).
* ``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS``: positive integer, default 120; same fallback.

Where this differs from Dynamo, it accepts more, never less:

* Dynamo uses TLS only when username/password are *not* set (an ``else if``); here both apply
  together (authentication over TLS), which is what an operator setting both means.
* A CA alone (no client certificate) is used for ``https://`` endpoints; Dynamo ignores an incomplete
  TLS triple.

Endpoint schemes follow the etcd-client crate Dynamo links: ``https://`` is TLS, ``http://`` is plain
text (and refused with a complete TLS triple: "TLS options are only supported with HTTPS URLs"), a bare
``host:port`` is TLS when the TLS triple is set and plain text otherwise.

Every variable is also a flag (``OPTIONS``, this backend's options table); ``load`` reads them through
the app's ``OptionReader`` and turns what Dynamo would log and ignore into start-up errors naming the
variable and the flag, so a half-configured TLS or login is never silently dropped.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sidecar.core.smg_manifest import SmgManifestSettings
from sidecar.peers.options import Option, OptionReader, parse_positive_int

DEFAULT_ENDPOINTS = "http://localhost:2379"
DEFAULT_LEASE_TTL = 30
"""What the released runtime (ai-dynamo-runtime 1.6.1) grants without ETCD_LEASE_TTL: 30 s, measured on a
real etcd (LeaseTimeToLive grantedTTL of a worker's primary lease); older notes and the design brief say 10."""
DEFAULT_STARTUP_CONNECT_TIMEOUT = 120.0

ENDPOINTS_ENV = "ETCD_ENDPOINTS"
LEASE_TTL_ENV = "ETCD_LEASE_TTL"
STARTUP_TIMEOUT_ENV = "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS"
USERNAME_ENV = "ETCD_AUTH_USERNAME"
PASSWORD_ENV = "ETCD_AUTH_PASSWORD"  # noqa: S105 - the variable's name, not a password
CA_ENV = "ETCD_AUTH_CA"
CLIENT_CERT_ENV = "ETCD_AUTH_CLIENT_CERT"
CLIENT_KEY_ENV = "ETCD_AUTH_CLIENT_KEY"


OPTIONS: tuple[Option, ...] = (
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
)


class EtcdSettingsError(ValueError):
    """The etcd settings cannot work; ``problems`` has one sentence per variable (what was expected, found)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL: where to dial and whether with TLS."""

    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        """The gRPC target (``host:port``; IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.target}"


@dataclass(frozen=True)
class EtcdSettings:
    """Everything needed to connect to etcd and hold a lease; build it with ``from_env`` or directly."""

    endpoints: tuple[Endpoint, ...] = (Endpoint("localhost", 2379, False),)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)
    client_cert_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)
    lease_ttl: int = DEFAULT_LEASE_TTL
    startup_connect_timeout: float = DEFAULT_STARTUP_CONNECT_TIMEOUT

    @property
    def smg_manifest(self) -> SmgManifestSettings | None:
        """Always None: etcd peers carry no pods, hence no workers for SGLang Model Gateway's manifest."""
        return None

    @property
    def tls(self) -> bool:
        return any(e.tls for e in self.endpoints)

    @property
    def endpoints_text(self) -> str:
        return ",".join(e.url for e in self.endpoints)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> tuple[EtcdSettings, list[str]]:
        """The settings and the warnings to log (values Dynamo too would ignore or replace by defaults).

        Raises ``EtcdSettingsError`` naming every variable that cannot work.
        """
        problems: list[str] = []
        warnings: list[str] = []

        username, password = env.get(USERNAME_ENV), env.get(PASSWORD_ENV)
        if (username is None) != (password is None):
            given, missing = (USERNAME_ENV, PASSWORD_ENV) if username is not None else (PASSWORD_ENV, USERNAME_ENV)
            warnings.append(f"{given} is set without {missing}: both are ignored (as Dynamo does)")
            username = password = None

        pems: dict[str, bytes | None] = {}
        for name in (CA_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV):
            raw = env.get(name)
            pems[name] = None if raw is None else _pem(name, raw, problems)
        ca, cert, key = pems[CA_ENV], pems[CLIENT_CERT_ENV], pems[CLIENT_KEY_ENV]
        if (env.get(CLIENT_CERT_ENV) is None) != (env.get(CLIENT_KEY_ENV) is None):
            problems.append(
                f"{CLIENT_CERT_ENV} and {CLIENT_KEY_ENV}: set both (the client certificate and its key) or neither"
            )
        tls_triple = ca is not None and cert is not None and key is not None

        endpoints = _endpoints(env.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS), tls_triple, problems)
        if endpoints and not any(e.tls for e in endpoints) and (ca or cert or key) and not tls_triple:
            warnings.append(
                f"{CA_ENV}/{CLIENT_CERT_ENV}/{CLIENT_KEY_ENV} are ignored: the endpoints are http:// "
                "(use https:// URLs for TLS)"
            )

        lease_ttl = _positive_int(env, LEASE_TTL_ENV, DEFAULT_LEASE_TTL, warnings)
        startup = float(_positive_int(env, STARTUP_TIMEOUT_ENV, int(DEFAULT_STARTUP_CONNECT_TIMEOUT), warnings))
        if problems:
            raise EtcdSettingsError(problems)
        return (
            cls(
                endpoints=tuple(endpoints),
                username=username,
                password=password,
                ca_pem=ca,
                client_cert_pem=cert,
                client_key_pem=key,
                lease_ttl=lease_ttl,
                startup_connect_timeout=startup,
            ),
            warnings,
        )


def _pem(name: str, raw: str, problems: list[str]) -> bytes | None:
    if "-----BEGIN" in raw:
        return raw.encode()
    path = pathlib.Path(raw)
    try:
        text = path.read_bytes()
    except OSError as exc:
        problems.append(
            f"{name}: expected PEM text (as Dynamo reads it) or the path of a PEM file; found neither "
            f"({raw[:60]!r}: {exc.strerror or type(exc).__name__})"
        )
        return None
    if b"-----BEGIN" not in text:
        problems.append(f"{name}: the file {raw} holds no PEM block")
        return None
    return text


def _endpoints(raw: str, tls_triple: bool, problems: list[str]) -> list[Endpoint]:
    out = []
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        problems.append(f"{ENDPOINTS_ENV}: expected comma-separated URLs such as {DEFAULT_ENDPOINTS}; found {raw!r}")
        return []
    for part in parts:
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = ("https" if tls_triple else "http"), part
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            problems.append(f"{ENDPOINTS_ENV}: {part!r} is not an http:// or https:// URL")
            continue
        if scheme == "http" and tls_triple:
            problems.append(
                f"{ENDPOINTS_ENV}: {part!r} is http:// but {CA_ENV}/{CLIENT_CERT_ENV}/{CLIENT_KEY_ENV} are set; "
                "TLS options are only supported with https:// URLs (as in Dynamo's etcd client)"
            )
            continue
        hostport = rest.split("/", 1)[0]
        host, port = _split_hostport(hostport)
        if not host or port is None:
            problems.append(f"{ENDPOINTS_ENV}: {part!r} has no host:port")
            continue
        out.append(Endpoint(host, port, scheme == "https"))
    return out


def _split_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = text.rpartition(":")
        if not host:
            host, port_text = text, "2379"
    try:
        port = int(port_text or "2379")
    except ValueError:
        return host, None
    return host, port if 0 < port < 65536 else None


def _positive_int(env: Mapping[str, str], name: str, default: int, warnings: list[str]) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        warnings.append(f"{name}={raw!r} is not an integer number of seconds; using {default} (as Dynamo does)")
        return default
    if value <= 0:
        warnings.append(f"{name} must be at least 1; got {value}; using {default} (as Dynamo does)")
        return default
    return value


def load(reader: OptionReader, foreign: Sequence[Option] = ()) -> EtcdSettings | None:
    """Read this table; None when any problem was recorded.

    Peers are Dynamo's ``v1/`` keys and registration is a lease: no Service, no UID. Another backend's
    option that chooses what is watched (``Option.chooses``) would silently mean nothing here, so it is
    refused.
    """
    for option in foreign:
        if option.chooses and reader.get(option.env) is not None:
            reader.problems.append(
                f"{reader.where(option.env)} chooses {option.chooses}, but {reader.where('DYN_DISCOVERY_BACKEND')} "
                "is etcd, where every instance under etcd's v1/ keys is a peer: unset it"
            )
    ttl = reader.get(LEASE_TTL_ENV, parse_positive_int)
    startup = reader.get(STARTUP_TIMEOUT_ENV, parse_positive_int)
    values = {o.env: reader.get(o.env) for o in OPTIONS if o.env not in (LEASE_TTL_ENV, STARTUP_TIMEOUT_ENV)}
    values[LEASE_TTL_ENV] = None if ttl is None else str(ttl)  # already reported when unusable
    values[STARTUP_TIMEOUT_ENV] = None if startup is None else str(startup)
    settings: EtcdSettings | None = None
    try:
        settings, warnings = EtcdSettings.from_env({k: v for k, v in values.items() if v is not None})
    except EtcdSettingsError as exc:
        warnings = exc.problems
    # Dynamo logs these and goes on without the setting; the sidecar refuses to start on them instead,
    # so a half-configured TLS or login is never silently dropped.
    reader.problems.extend(_name_flags(reader, warning) for warning in warnings)
    return None if reader.problems else settings


def _name_flags(reader: OptionReader, sentence: str) -> str:
    """``sentence`` with each etcd variable it names followed by its flag, once."""
    for option in OPTIONS:
        sentence = re.sub(rf"\b{option.env}\b(?! \()", reader.where(option.env), sentence, count=1)
    return sentence
