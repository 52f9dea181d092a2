"""The Kubernetes backend's settings: its options table, their cross-checks, and ``KubeSettings``.

Which objects define peer readiness (EndpointSlices of a Service or selector, or Pods by label, or
Dynamo's container mode), where peers are watched, how the initial state is listed, how peers' workers
are described, SGLang Model Gateway's manifest (which lists those workers), and how this pod's CR is
written. ``load`` reads these rows through ``sidecar.peers.options.OptionReader`` (the precedence is the
app's) and records every problem, naming the variable and the flag; nothing here imports the
Kubernetes client, so ``--help`` and configuration errors cost no client import.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from sidecar.core.containers import DEFAULT_MAIN_CONTAINER, metadata_name
from sidecar.core.selectors import EVERYTHING, LabelSelector, SelectorError, parse_selector, selector_from_labels
from sidecar.core.smg_manifest import SmgManifestSettings, SmgRoles, parse_smg_selector
from sidecar.core.workers import ModelIdFrom, WorkerPolicy, WorkerProtocol
from sidecar.peers.options import (
    Option,
    OptionReader,
    known,
    parse_bool,
    parse_choice,
    parse_port,
    parse_selector_value,
)
from sidecar.peers.ports import PodIdentity

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONTAINER_MODE_POD_SELECTOR = "nvidia.com/dynamo-discovery-enabled=true"
"""The Pods Dynamo's container mode watches (the label its operator puts on discoverable workloads)."""
CHOOSES = "Kubernetes objects"


class KubeDiscoveryMode(StrEnum):
    """Dynamo's ``DYN_KUBE_DISCOVERY_MODE``: one instance per pod, or one per registering container."""

    POD = "pod"
    CONTAINER = "container"


class InitialList(StrEnum):
    """How a watch gets its initial state (``DISCOVERY_INITIAL_LIST``)."""

    STREAM = "stream"  # a watch with sendInitialEvents (paginated LIST where the server refuses it)
    PAGES = "pages"  # paginated LIST


OPTIONS: tuple[Option, ...] = (
    Option(
        "DISCOVERY_SERVICE_NAME",
        "--service-name",
        "the Service whose EndpointSlices define peer readiness (label kubernetes.io/service-name)",
        chooses=CHOOSES,
    ),
    Option(
        "DISCOVERY_ENDPOINTSLICE_SELECTOR",
        "--endpointslice-selector",
        "label selector for the EndpointSlices to watch; combined (AND) with --service-name when both are set",
        chooses=CHOOSES,
    ),
    Option(
        "DISCOVERY_POD_SELECTOR",
        "--pod-selector",
        "label selector over Pods: Pods become the readiness source (Ready, Running, with an IP), no Service needed",
        chooses=CHOOSES,
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
        chooses=CHOOSES,
    ),
    Option(
        "DISCOVERY_NAMESPACES",
        "--namespaces",
        "where peers are watched: empty for the pod's own namespace, a comma-separated list, or * for all",
        chooses=CHOOSES,
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
    Option("KUBECONFIG", "--kubeconfig", "kubeconfig to use outside a cluster (in a pod: the service account)"),
    Option(
        "DISCOVERY_FIELD_MANAGER", "--field-manager", "server-side apply field manager", default="discovery-sidecar"
    ),
)

SMG_ROLE_OPTIONS = {
    "regular": "DISCOVERY_SMG_SELECTOR",
    "prefill": "DISCOVERY_SMG_PREFILL_SELECTOR",
    "decode": "DISCOVERY_SMG_DECODE_SELECTOR",
    "encode": "DISCOVERY_SMG_ENCODE_SELECTOR",
}


@dataclass(frozen=True)
class KubeSettings:
    """Every validated setting of the Kubernetes backend; built once by ``load`` and only read after."""

    endpointslice_selector: LabelSelector | None  # None when Pods define readiness
    pod_selector: LabelSelector | None
    namespaces: tuple[str, ...]  # where peers are watched; ("",) is every namespace
    require_metadata: bool
    workers: WorkerPolicy
    smg_manifest: SmgManifestSettings | None
    kubeconfig: str | None
    field_manager: str
    mode: KubeDiscoveryMode
    container_name: str  # container mode: the container registered ("" in pod mode)
    metadata_name: str  # this pod's (or container's) DynamoWorkerMetadata name: the pod's, or {pod}-{container}
    initial_list: InitialList = InitialList.STREAM
    peer_selector: LabelSelector | None = None  # peers' labels this pod can ever want, sent to the API server

    @property
    def container_mode(self) -> bool:
        """Dynamo's container mode: Pods' containerStatuses are the readiness source."""
        return self.mode is KubeDiscoveryMode.CONTAINER

    @property
    def streaming_list(self) -> bool:
        """Initial state by a sendInitialEvents watch (else paginated LIST)."""
        return self.initial_list is InitialList.STREAM


def load(
    reader: OptionReader,
    identity: PodIdentity,
    foreign: Sequence[Option] = (),
    registers: bool = True,
    follows_relay: bool = False,
) -> KubeSettings | None:
    """Read this table (and the pod's UID, which owns the CR); None when any problem was recorded.

    ``identity`` is the pod as the common settings read it (its name and namespace may be placeholders
    when they were missing: the problem is recorded, and nothing is built). Other backends' options
    (``foreign``) are not read here, as Dynamo's Kubernetes backend ignores its etcd settings.
    """
    need_downward = "expose it with the downward API (fieldRef) or a podinfo volume"
    if registers:  # a relay (registers=False) watches only: it owns no CR
        reader.get("POD_UID", required=f"the pod's UID; {need_downward}")
    service = reader.get("DISCOVERY_SERVICE_NAME")
    slice_selector = reader.get("DISCOVERY_ENDPOINTSLICE_SELECTOR", parse_selector_value)
    selector = EVERYTHING
    if service:
        try:
            selector = selector.and_(selector_from_labels({SERVICE_NAME_LABEL: service}))
        except SelectorError as exc:
            reader.problems.append(f"{reader.where('DISCOVERY_SERVICE_NAME')}: not a valid Service name: {exc}")
    if isinstance(slice_selector, LabelSelector):
        selector = selector.and_(slice_selector)
    pod_selector = reader.get("DISCOVERY_POD_SELECTOR", parse_selector_value)
    wants_slices = bool(service) or "DISCOVERY_ENDPOINTSLICE_SELECTOR" in reader.raw
    mode = reader.get("DYN_KUBE_DISCOVERY_MODE", parse_choice(KubeDiscoveryMode))
    container = (reader.get("CONTAINER_NAME") or "").strip()
    main_container = (reader.get("DYN_MAIN_CONTAINER_NAME") or "").strip() or DEFAULT_MAIN_CONTAINER
    if mode is KubeDiscoveryMode.CONTAINER:
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
        if not follows_relay:  # following a relay, the relay's settings say what defines readiness
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
    worker_protocol = reader.get("DISCOVERY_WORKER_PROTOCOL", parse_choice(WorkerProtocol))
    model_id_from = reader.get("DISCOVERY_MODEL_ID_FROM", ModelIdFrom.parse)
    smg_manifest = _smg_manifest_settings(reader)
    initial_list = reader.get("DISCOVERY_INITIAL_LIST", parse_choice(InitialList))
    peer_selector = reader.get("DISCOVERY_PEER_SELECTOR", parse_selector_value)
    kubeconfig = reader.get("KUBECONFIG")
    field_manager = reader.get("DISCOVERY_FIELD_MANAGER")
    if reader.problems:
        return None
    # No problems, so every required setting was given and every one with a default parsed.
    return KubeSettings(
        endpointslice_selector=None if isinstance(pod_selector, LabelSelector) else selector,
        pod_selector=pod_selector if isinstance(pod_selector, LabelSelector) else None,
        namespaces=namespaces or (identity.namespace,),
        require_metadata=known(require_metadata),
        workers=WorkerPolicy(port=worker_port, protocol=known(worker_protocol).value, model_id_from=model_id_from),
        smg_manifest=smg_manifest,
        kubeconfig=kubeconfig,
        field_manager=known(field_manager),
        mode=known(mode),
        container_name=container,
        metadata_name=(
            metadata_name(identity.name, container, main_container)
            if mode is KubeDiscoveryMode.CONTAINER
            else identity.name
        ),
        initial_list=known(initial_list),
        peer_selector=peer_selector
        if isinstance(peer_selector, LabelSelector) and not peer_selector.is_empty()
        else None,
    )


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


def _smg_selector_value(text: str) -> LabelSelector:
    try:
        selector = parse_smg_selector(text)
    except SelectorError as exc:
        raise ValueError(f"invalid label selector: {exc}") from None
    if selector.is_empty():
        raise ValueError("an empty selector would list every peer; give a non-empty one")
    return selector


def _smg_manifest_settings(reader: OptionReader) -> SmgManifestSettings | None:
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
