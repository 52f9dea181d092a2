"""Waiting until sidecar injection is in effect in a namespace, as seen by admission itself.

Right after the injection policies, their parameters' CRD and a namespace's SidecarInjection are installed
(``helm install``, or after kube-apiserver restarts), there is a window in which admission cannot inject
yet, and refuses pods that opted in:

* ``failed to find resource referenced by paramKind``: the admission plugin resolves the policies'
  ``paramKind`` through a discovery cache that kube-apiserver refreshes every 30 s, so a CRD established
  a moment ago is not known to it yet;
* ``no params found``: the plugin's informer of SidecarInjection objects has not seen the namespace's yet.

Neither says "never": the only faithful test is to ask admission, so ``wait_until_injecting`` creates a
labelled pod with ``dryRun=All`` (nothing is stored) until it comes back with the sidecar, with a deadline.
Any other refusal is an error and is raised at once.
"""

from __future__ import annotations

from typing import Any

from devcluster.objects import PODS
from devcluster.waiting import wait_for
from sidecar.app.injection.template import load_template
from sidecar.kube.api import ApiError, KubeApi

NOT_YET = ("failed to find resource referenced by paramKind", "no params found")
"""The refusals of a policy that is installed but not in effect yet (see the module's docstring)."""

WINDOW = 90.0
"""How long the window may last: the 30 s discovery refresh, the policy's 1 s resync, the informer's first
list, with room for a loaded machine."""


def labelled_pod(name: str = "injection-probe", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A minimal pod that opts in by its own label (``labels`` are added)."""
    template = load_template()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {template.label: "true", **(labels or {})}},
        "spec": {"containers": [{"name": "main", "image": "ex/w:1"}], "automountServiceAccountToken": False},
    }


def dry_run_create(api: KubeApi, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The pod as admission would store it, or None while admission refuses it as not-yet-in-effect."""
    try:
        return api.request("POST", PODS.collection(namespace), [("dryRun", "All")], body=body)
    except ApiError as exc:
        if not_yet_in_effect(exc):
            return None
        raise


def not_yet_in_effect(exc: ApiError) -> bool:
    return exc.status == 403 and any(fragment in exc.message for fragment in NOT_YET)


def injected_sidecar(pod: dict[str, Any] | None) -> dict[str, Any] | None:
    """The injected sidecar container of an admitted pod, if it has one."""
    name = load_template().container_name
    for container in ((pod or {}).get("spec") or {}).get("initContainers") or ():
        if container["name"] == name:
            return dict(container)
    return None


def wait_until_injecting(
    api: KubeApi, namespace: str, timeout: float = WINDOW, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Block until a labelled pod (``body``, or ``labelled_pod()``) created in ``namespace`` gets the sidecar;
    return its sidecar container. After ``timeout``, TimeoutError says what admission last answered."""
    probe = body or labelled_pod()
    last = ["no answer yet"]

    def sidecar() -> dict[str, Any] | None:
        try:
            admitted = api.request("POST", PODS.collection(namespace), [("dryRun", "All")], body=probe)
        except ApiError as exc:
            if not not_yet_in_effect(exc):
                raise
            last[0] = exc.message
            return None
        last[0] = "admitted without the sidecar"
        return injected_sidecar(admitted)

    try:
        return wait_for(sidecar, timeout, interval=0.5, what=f"sidecar injection in namespace {namespace}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; admission last answered: {last[0]}") from None
