"""Playing the kubelet for one container: its environment and volumes, as the kubelet would present them.

There is no kubelet here, so a process started "from a pod spec" gets what the kubelet would give the
container: each ``env`` entry resolved (``value`` with ``$(VAR)`` expansion, ``fieldRef`` read from the
Pod object the API server returned), each mounted ``downwardAPI`` volume written as files (labels and
annotations in the kubelet's ``key="value"`` lines), each ``emptyDir`` an empty directory. Everything
runs on one host, so two things are translated and said so: a mount path becomes a directory under the
work directory (paths in the environment follow it), and the pod's own network becomes loopback ports
chosen here (``PodNetwork``). Anything else in a spec (secrets, config maps, other volume types) is refused
with the name of what is missing, rather than silently left out.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

_FIELD_SUBSCRIPT = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class UnsupportedSpec(ValueError):
    """Something in the container's spec this stand-in cannot provide (names it)."""


def _quoted_lines(values: Mapping[str, str]) -> str:
    """The kubelet's format for labels/annotations files: ``key="value"`` per line, sorted, Go-quoted."""
    return "\n".join(f"{key}={json.dumps(values[key])}" for key in sorted(values))


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """What ``fieldRef.fieldPath`` selects from ``pod`` (the fields the downward API supports)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        return _quoted_lines(meta.get(path.split(".")[1]) or {})
    subscript = _FIELD_SUBSCRIPT.fullmatch(path)
    if subscript:
        return str((meta.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise UnsupportedSpec(f"fieldRef {path!r} is not supported by the kubelet stand-in")


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, in order, ``$(VAR)`` expanded."""
    env: dict[str, str] = {}
    for entry in container.get("env") or ():
        name = entry["name"]
        if "valueFrom" in entry:
            source = entry["valueFrom"]
            if "fieldRef" not in source:
                raise UnsupportedSpec(f"env {name}: only fieldRef is supported, got {sorted(source)}")
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            value = str(entry.get("value", ""))
            env[name] = _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)
    if container.get("envFrom"):
        raise UnsupportedSpec("envFrom is not supported by the kubelet stand-in")
    return env


@dataclass
class PodNetwork:
    """The pod's network namespace, on a shared host: each listen address of the pod gets a loopback port.

    ``ports`` maps the container's port to the host port chosen for it (so probes and clients find it)."""

    free_port: Callable[[], int]
    ports: dict[int, int] = field(default_factory=dict)

    def listen(self, address: str) -> str:
        """``host:port`` inside the pod -> ``127.0.0.1:P`` on this host; a ``unix://`` path is left alone."""
        if address.startswith("unix:") or ":" not in address:
            return address
        port = int(address.rsplit(":", 1)[1])
        if port not in self.ports:
            self.ports[port] = self.free_port()
        return f"127.0.0.1:{self.ports[port]}"


def mount_volumes(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    root: pathlib.Path,
    config_map: Callable[[str, str], Mapping[str, str] | None] | None = None,
) -> dict[str, pathlib.Path]:
    """Materialise the container's mounts under ``root``: mount path -> host directory.

    The service-account token volume is skipped (the stand-in hands the process a pod-bound token in a
    kubeconfig instead: in-cluster credentials are read from a fixed path that cannot be moved). A configMap
    volume gets the ConfigMap's keys as files, read with ``config_map(namespace, name)`` (None: it does not
    exist, which leaves an optional volume empty and refuses a required one, as the kubelet would)."""
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or ()}
    mounts: dict[str, pathlib.Path] = {}
    for mount in container.get("volumeMounts") or ():
        volume = volumes.get(mount["name"])
        if volume is None:
            raise UnsupportedSpec(f"volumeMount {mount['name']}: the pod has no such volume")
        host = root / mount["name"]
        if "projected" in volume and any("serviceAccountToken" in s for s in volume["projected"].get("sources", ())):
            continue
        host.mkdir(parents=True, exist_ok=True)
        if "downwardAPI" in volume:
            for item in volume["downwardAPI"].get("items") or ():
                if "fieldRef" not in item:
                    raise UnsupportedSpec(f"volume {mount['name']}: only fieldRef items are supported")
                (host / item["path"]).write_text(field_value(pod, item["fieldRef"]["fieldPath"]))
        elif "configMap" in volume and config_map is not None:
            source = volume["configMap"]
            data = config_map(pod["metadata"]["namespace"], source["name"])
            if data is None and not source.get("optional"):
                raise UnsupportedSpec(f"volume {mount['name']}: ConfigMap {source['name']} does not exist")
            paths = {i["key"]: i["path"] for i in source.get("items") or ()} or {k: k for k in data or {}}
            for key, path in paths.items():
                if data and key in data:
                    (host / path).write_text(data[key])
        elif "emptyDir" not in volume:
            raise UnsupportedSpec(f"volume {mount['name']}: only downwardAPI, configMap and emptyDir are supported")
        mounts[mount["mountPath"]] = host
    return mounts


def translate_paths(env: Mapping[str, str], mounts: Mapping[str, pathlib.Path]) -> dict[str, str]:
    """Values that name a path under a mount point name the host directory instead."""
    result = dict(env)
    for name, value in env.items():
        for mount_path, host in mounts.items():
            for prefix in ("unix://", "unix:", ""):
                if value == prefix + mount_path or value.startswith(prefix + mount_path.rstrip("/") + "/"):
                    result[name] = prefix + str(host) + value[len(prefix + mount_path) :]
                    break
    return result
