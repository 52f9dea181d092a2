"""A peer's workers: the ``protocol://address:port`` servers a gateway sends requests to.

A gateway (SGLang Model Gateway) does not dial a pod, it dials the serving processes in it: one pod may
run several (one per GPU group), each on its own port, each prefill or encode server with its own
bootstrap port. SMG reads that from the pod, and so does this module, with SMG's names:

* the ports: the annotation ``smg.ai/worker-ports: "8080,8081"`` (one worker per port, duplicates
  dropped, order kept), else ``DISCOVERY_WORKER_PORT``, else the one port the pod (or its
  EndpointSlice) declares, else none;
* the bootstrap ports: ``sglang.ai/bootstrap-port``, one value for every worker or a list aligned with
  the ports;
* the model id: ``DISCOVERY_MODEL_ID_FROM`` (``namespace``, ``label:<key>``, ``annotation:<key>``);
* the protocol: ``DISCOVERY_WORKER_PROTOCOL`` (``http`` or ``grpc``);
* vLLM's KV transfer: the annotations ``smg.ai/kv-connector`` and ``smg.ai/kv-engine-id`` (SMG's default
  ``--kv-connector-annotation`` and ``--kv-engine-id-annotation``), passed through as they are.

Where this differs from SMG, on purpose: an annotation that does not parse is never guessed around.
SMG falls back to its configured port (a URL the pod never announced) or drops the bootstrap port (a
prefill worker that PD routing cannot use); here the entries that do not parse are skipped and the
problem is returned, for the shell to log. Nothing here raises on a pod's content.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

WORKER_PORTS_ANNOTATION = "smg.ai/worker-ports"
BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"
KV_CONNECTOR_ANNOTATION = "smg.ai/kv-connector"
KV_ENGINE_ID_ANNOTATION = "smg.ai/kv-engine-id"


class WorkerProtocol(StrEnum):
    """The scheme of a peer's worker URLs (``DISCOVERY_WORKER_PROTOCOL``)."""

    HTTP = "http"
    GRPC = "grpc"


PROTOCOLS = tuple(p.value for p in WorkerProtocol)


@dataclass(frozen=True)
class ModelIdFrom:
    """Where a worker's model id comes from: the pod's namespace, one of its labels or annotations."""

    kind: str  # "namespace", "label" or "annotation"
    key: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelIdFrom:
        """SMG's ``--model-id-from`` syntax; ValueError with the accepted forms otherwise."""
        value = text.strip()
        if value.lower() == "namespace":
            return cls("namespace")
        for kind in ("label", "annotation"):
            if value.startswith(f"{kind}:"):
                key = value[len(kind) + 1 :].strip()
                if not key:
                    raise ValueError(f"{kind}: needs a key, e.g. {kind}:model")
                return cls(kind, key)
        raise ValueError(f"expected namespace, label:<key> or annotation:<key>, got {text!r}")

    def __str__(self) -> str:
        return self.kind if self.kind == "namespace" else f"{self.kind}:{self.key}"


@dataclass(frozen=True)
class WorkerPolicy:
    """The settings that turn a pod into workers; one per sidecar, given to the join."""

    port: int | None = None  # DISCOVERY_WORKER_PORT: the serving port unless the pod says otherwise
    protocol: str = "http"  # DISCOVERY_WORKER_PROTOCOL
    model_id_from: ModelIdFrom | None = None  # DISCOVERY_MODEL_ID_FROM


@dataclass(frozen=True, order=True)
class Worker:
    """One serving process of a peer, as a gateway registers it."""

    url: str  # protocol://host:port, IPv6 hosts in brackets
    port: int
    protocol: str
    bootstrap_port: int | None = None
    model_id: str = ""
    kv_connector: str = ""
    kv_engine_id: str = ""


@dataclass(frozen=True)
class PodView:
    """What the worker rule reads of one peer: its address and what it (or its source) declares."""

    address: str  # the pod's primary IP
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    declared_ports: Sequence[int] = ()


def _port(text: str) -> int | None:
    text = text.strip()
    if not re.fullmatch(r"\d{1,5}", text):
        return None
    value = int(text)
    return value if 1 <= value <= 65535 else None


def _port_list(raw: str, what: str, problems: list[str]) -> list[int | None]:
    """Each comma-separated entry as a port, or None (with a problem) when it is not one."""
    values: list[int | None] = []
    for part in raw.split(","):
        port = _port(part)
        if port is None:
            problems.append(f"annotation {what}: {part.strip()!r} is not a port (1-65535)")
        values.append(port)
    return values


def _ports(view: PodView, policy: WorkerPolicy, problems: list[str]) -> list[int | None]:
    raw = view.annotations.get(WORKER_PORTS_ANNOTATION)
    if raw is not None:
        seen: set[int] = set()
        ports: list[int | None] = []
        for port in _port_list(raw, WORKER_PORTS_ANNOTATION, problems):
            if port is None or port not in seen:
                ports.append(port)
                if port is not None:
                    seen.add(port)
        return ports
    if policy.port is not None:
        return [policy.port]
    declared = sorted(set(view.declared_ports))
    return [declared[0]] if len(declared) == 1 else []


def _bootstrap_ports(view: PodView, count: int, problems: list[str]) -> list[int | None] | None:
    """Bootstrap ports aligned with ``count`` worker ports; None for every worker when the pod gives
    none. An entry that does not parse is None (that worker is skipped); a list of the wrong length
    is a problem for every worker."""
    raw = view.annotations.get(BOOTSTRAP_PORT_ANNOTATION)
    if raw is None:
        return None
    values = _port_list(raw, BOOTSTRAP_PORT_ANNOTATION, problems)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        problems.append(
            f"annotation {BOOTSTRAP_PORT_ANNOTATION}: {len(values)} ports for {count} worker port(s); "
            "give one port, or one per worker port"
        )
        return [None] * count
    return values


def model_id(view: PodView, source: ModelIdFrom | None) -> str:
    if source is None:
        return ""
    if source.kind == "namespace":
        return view.namespace
    values = view.labels if source.kind == "label" else view.annotations
    return values.get(source.key, "")


def url(protocol: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{protocol}://{host}:{port}"


def pod_workers(view: PodView, policy: WorkerPolicy) -> tuple[tuple[Worker, ...], tuple[str, ...]]:
    """The peer's workers, in port order, and why any announced worker was skipped."""
    problems: list[str] = []
    if not view.address:
        return (), ()
    ports = _ports(view, policy, problems)
    bootstrap = _bootstrap_ports(view, len(ports), problems)
    model = model_id(view, policy.model_id_from)
    kv_connector = view.annotations.get(KV_CONNECTOR_ANNOTATION, "")
    kv_engine_id = view.annotations.get(KV_ENGINE_ID_ANNOTATION, "")
    workers = []
    for index, port in enumerate(ports):
        if port is None:
            continue
        boot = None if bootstrap is None else bootstrap[index]
        if bootstrap is not None and boot is None:
            problems.append(f"worker port {port} skipped: its bootstrap port is not usable")
            continue
        address = url(policy.protocol, view.address, port)
        workers.append(Worker(address, port, policy.protocol, boot, model, kv_connector, kv_engine_id))
    return tuple(workers), tuple(problems)
