"""SGLang Model Gateway's worker manifest, computed from the peer set.

SMG 1.13 reads its workers from a JSON file (``smg launch --discovery-provider file --discovery-file
PATH``), re-read as soon as it changes. Its schema, as the released binary states it when handed a
wrong file: ``{"version": 1, "workers": [...]}``, nothing else at the top; each worker ``url`` and
``worker_type`` (``regular``, ``prefill``, ``decode``, ``encode``), optionally ``bootstrap_port``,
``model_id``, ``id``, ``kv_connector``, ``kv_role``, ``kv_engine_id``; any other field makes SMG reject
the whole file. So a sidecar in the gateway's pod can replace SMG's own Kubernetes watcher: this
module decides the document, ``sidecar.serve.smg_writer`` puts it on disk.

Roles mirror SMG's flags: a peer takes the role of the first selector it matches, in SMG's order
encode, prefill, decode; otherwise it is ``regular`` when it matches the regular selector, else it is
not a worker of this gateway. Only READY peers are listed: SMG drops a pod from the moment it has a
``deletionTimestamp`` and drains its worker itself, and so a DRAINING peer leaves the manifest.
A bootstrap port is written for prefill and encode workers only, as SMG reads it. Each worker's ``id``
is ``{pod UID}:{port}``, as SMG's own Kubernetes discovery names the workers it registers: a pod
recreated under the same name at the same address is a new worker to SMG (re-probed, its old
registration removed), never the old one carried over.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.peer import Peer, PeerState
from sidecar.core.selectors import LabelSelector, parse_selector

MANIFEST_VERSION = 1
ROLE_ORDER = ("encode", "prefill", "decode")
BOOTSTRAP_ROLES = frozenset({"prefill", "encode"})

_SMG_SELECTOR = re.compile(r"\s*[^\s,=!()]+=[^\s,=!()]*(\s+[^\s,=!()]+=[^\s,=!()]*)+\s*")


def parse_smg_selector(text: str) -> LabelSelector:
    """A Kubernetes label selector, or SMG's own spelling ``k1=v1 k2=v2`` (space-separated equalities),
    so a flag value can be copied from an ``smg`` command line as it is. Raises ``SelectorError``."""
    if _SMG_SELECTOR.fullmatch(text):
        text = ",".join(text.split())
    return parse_selector(text)


@dataclass(frozen=True)
class SmgRoles:
    """The selectors that put peers into the manifest, each in its role; None: that role is not used."""

    regular: LabelSelector | None = None
    prefill: LabelSelector | None = None
    decode: LabelSelector | None = None
    encode: LabelSelector | None = None

    def role(self, labels: Mapping[str, str]) -> str | None:
        """The peer's ``worker_type``, or None when it is not one of this gateway's workers."""
        for name in ROLE_ORDER:
            selector: LabelSelector | None = getattr(self, name)
            if selector is not None and selector.matches(labels):
                return name
        if self.regular is not None and self.regular.matches(labels):
            return "regular"
        return None


@dataclass(frozen=True)
class SmgManifestSettings:
    """Where SMG's worker manifest goes and which peers it lists in which role."""

    path: pathlib.Path
    roles: SmgRoles


def smg_manifest(peers: Iterable[Peer], roles: SmgRoles) -> dict[str, Any]:
    """The manifest SMG should read for this peer set: one entry per worker of every ready peer with a
    role, ordered by URL so equal peer sets give equal text. Two peers announcing one URL (an IP handed
    to a new pod before the old pod's status says so) give one entry, the smallest pod UID's."""
    entries: dict[str, dict[str, Any]] = {}
    for peer in sorted(peers, key=lambda p: p.uid):
        if peer.state is not PeerState.READY:
            continue
        role = roles.role(peer.labels)
        if role is None:
            continue
        for worker in peer.workers:
            if worker.url in entries:
                continue
            entry: dict[str, Any] = {"id": f"{peer.uid}:{worker.port}", "url": worker.url, "worker_type": role}
            if role in BOOTSTRAP_ROLES and worker.bootstrap_port is not None:
                entry["bootstrap_port"] = worker.bootstrap_port
            if worker.model_id:
                entry["model_id"] = worker.model_id
            if worker.kv_connector:
                entry["kv_connector"] = worker.kv_connector
            if worker.kv_engine_id:
                entry["kv_engine_id"] = worker.kv_engine_id
            entries[worker.url] = entry
    return {"version": MANIFEST_VERSION, "workers": [entries[url] for url in sorted(entries)]}


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """The file's text: stable (sorted keys) so "rewrite only on change" is a text comparison."""
    return json.dumps(manifest, sort_keys=True, indent=2) + "\n"
