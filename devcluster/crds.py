"""Deleting CRDs on the dev control plane promptly, around a race in kube-apiserver's CRD finalizer.

A deleted CRD keeps the finalizer ``customresourcecleanup.apiextensions.k8s.io`` until kube-apiserver's CRD
finalizer has listed and deleted its instances through the CRD's storage. That storage is made on first
use; when nothing has used it since the CRD was (re)created (a chart just installed it, no pod registered
yet), the finalizer makes it and lists at once, before its watch cache is initialised. The list is refused
("storage is (re)initializing": resilient watch-cache initialisation, KEP-4568), and the finalizer records
``Terminating`` with reason ``InstanceDeletionFailed`` and retries, rate-limited, 5 ms later. The retry
reads the CRD from an informer that has not seen that status write yet, so its update conflicts (409), and
on a conflict the finalizer drops the item, counting on the next update event to requeue it; but an update
that changes nothing but the ``Terminating`` condition is one it deliberately ignores (it wrote it). The
CRD then stays until the informer's resync, 5 minutes later (measured on this project's 1.36.3: 278 s, with
two 409s right after the failure in the API server's log; operator-framework/operator-controller#1437 saw
the same). It happens on a loaded machine, where the retry beats the informer.

``delete_crds`` removes the cause: before deleting, it lists each CRD's instances the way the finalizer
does (all namespaces, no limit, no resourceVersion: served by the watch cache) until the storage answers,
so the finalizer's first list succeeds and there is no retry to lose. Should the finalizer stall all the
same (a watch cache reinitialising in between), any other change to the CRD requeues it: an annotation.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Callable, Iterable

from devcluster.cluster import ControlPlane
from devcluster.waiting import wait_for
from sidecar.kube.api import ApiError, KubeApi

REQUEUE_ANNOTATION = "devcluster.discovery-sidecar.io/requeue-finalizer"
"""Set on a CRD whose finalizer stalled: a change the finalizer does not ignore, so it tries again."""

STALLED = "InstanceDeletionFailed"
"""The ``Terminating`` condition's reason while the finalizer could not list or delete the instances."""


def _kubectl(plane: ControlPlane, *args: str) -> str:
    argv = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _crd_fields(plane: ControlPlane, name: str, jsonpath: str) -> list[str] | None:
    """Fields of a CRD through kubectl (Dynamo's CRDs are 1.6 MB: the sidecar's guarded decoder is slow on
    them), or None when it does not exist."""
    output = _kubectl(plane, "get", f"crd/{name}", "--ignore-not-found", "-o", f"jsonpath={jsonpath}")
    return output.split("\t") if output else None


def instances_path(plane: ControlPlane, name: str) -> str | None:
    """Where the CRD's instances are listed across namespaces, in its storage version (what the finalizer
    lists), or None when the CRD does not exist."""
    fields = _crd_fields(
        plane, name, "{.metadata.name}\t{.spec.group}\t{.spec.versions[?(@.storage==true)].name}\t{.spec.names.plural}"
    )
    if fields is None:
        return None
    _, group, version, plural = fields
    return f"/apis/{group}/{version}/{plural}"


def wait_for_instance_storage(api: KubeApi, path: str, timeout: float = 60.0) -> None:
    """Block until a consistent, unpaginated list of ``path`` is served: the CRD's storage exists and its
    watch cache is initialised (until then the API server answers 429, as it does to the finalizer)."""

    def served() -> bool:
        try:
            api.get(path, verb="list")
        except ApiError as exc:
            if exc.status == 429:
                return False
            raise
        return True

    wait_for(served, timeout, interval=0.2, what=f"the watch cache of {path}")


def delete_crds(
    plane: ControlPlane,
    api: KubeApi,
    names: Iterable[str],
    timeout: float = 120.0,
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Delete the CRDs ``names`` that exist (with their instances) and wait until they are gone."""
    paths = {name: path for name in sorted(set(names)) if (path := instances_path(plane, name)) is not None}
    if not paths:
        return
    for path in paths.values():
        wait_for_instance_storage(api, path)
    _kubectl(plane, "delete", *(f"crd/{name}" for name in paths), "--ignore-not-found", "--wait=false")
    requeues = itertools.count(1)
    stalled_since: dict[str, float] = {}
    requeued_at: dict[str, float] = {}

    def gone() -> bool:
        remaining = False
        for name in paths:
            fields = _crd_fields(plane, name, '{.metadata.name}\t{.status.conditions[?(@.type=="Terminating")].reason}')
            if fields is None:
                continue
            remaining = True
            now = time.monotonic()
            if fields[-1] != STALLED:
                stalled_since.pop(name, None)
                continue
            # A failed attempt is retried within milliseconds; one still failed after 2 s was dropped.
            since = stalled_since.setdefault(name, now)
            if now - since >= 2.0 and now - requeued_at.get(name, 0.0) >= 2.0:
                log(f"CRD {name}: the finalizer stalled ({STALLED}); requeueing it")
                _requeue(plane, name, next(requeues))
                requeued_at[name] = now
        return not remaining

    wait_for(gone, timeout, interval=0.5, what=f"CRDs {', '.join(paths)} to be deleted")


def _requeue(plane: ControlPlane, name: str, count: int) -> None:
    """Change the CRD's metadata, which the finalizer's update handler does not ignore (gone meanwhile: done)."""
    argv = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", "annotate", f"crd/{name}",
            f"{REQUEUE_ANNOTATION}={count}", "--overwrite"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "NotFound" not in result.stderr:
        raise RuntimeError(f"kubectl annotate crd/{name} failed ({result.returncode}): {result.stderr.strip()}")
