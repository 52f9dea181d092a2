"""``discovery-sidecar inject``: add the sidecar to the pods of manifests, for clusters without the policy.

Reads YAML or JSON documents, finds every pod template (a Pod, the ``spec.template`` of a Deployment,
StatefulSet, DaemonSet, ReplicaSet or Job, a CronJob's job template, the items of a ``List``) and adds
the sidecar from the same template the MutatingAdmissionPolicy is made from (``pod.inject_pod``).
Pods labelled ``discovery-sidecar.io/inject: "false"`` and pods that already declare the sidecar are
left as they are; other documents pass through unchanged. Running it twice changes nothing more.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, TextIO

import yaml

from sidecar.app.injection.pod import ParameterError, check_params, inject_pod
from sidecar.app.injection.template import Template, load_template

_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"})


class ManifestError(ValueError):
    """Input that is not a manifest (names the document)."""


def pod_templates(document: MutableMapping[str, Any]) -> Iterator[MutableMapping[str, Any]]:
    """Each object with ``metadata`` and ``spec`` that is a pod (template) inside ``document``."""
    kind = document.get("kind")
    spec = document.get("spec")
    if kind == "Pod" and isinstance(spec, dict):
        yield document
    elif kind in _TEMPLATE_KINDS and isinstance(spec, dict) and isinstance(spec.get("template"), dict):
        yield spec["template"]
    elif kind == "CronJob" and isinstance(spec, dict):
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        if isinstance(template, dict):
            yield template
    elif kind is not None and kind.endswith("List") and isinstance(document.get("items"), list):
        for item in document["items"]:
            if isinstance(item, dict):
                yield from pod_templates(item)


def inject_document(document: MutableMapping[str, Any], params: Mapping[str, str], template: Template) -> int:
    """Inject into every pod template of ``document`` in place; return how many got the sidecar."""
    count = 0
    for pod in pod_templates(document):
        metadata = pod.get("metadata") or {}
        if (metadata.get("labels") or {}).get(template.label) == "false":
            continue
        spec = pod.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
            continue
        injected = inject_pod(metadata, spec, params, template)
        if injected is not None:
            pod["spec"] = injected
            count += 1
    return count


def load_params(args: argparse.Namespace, template: Template) -> dict[str, str]:
    """The template's defaults, then a parameter file (``--params``: the SidecarInjection object the chart or the
    kustomize component installs, or a ConfigMap with the same data), then ``--set KEY=VALUE``."""
    params = template.default_params()
    if args.params:
        try:
            with open(args.params) as handle:
                config_map = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ParameterError(f"--params {args.params}: cannot read it: {exc}") from None
        data = config_map.get("data") if isinstance(config_map, dict) else None
        if not isinstance(data, dict):
            raise ParameterError(f"--params {args.params}: expected a SidecarInjection (or a ConfigMap) with data")
        params.update({str(k): str(v) for k, v in data.items()})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--set expects KEY=VALUE, got {item!r}")
        params[key] = value
    check_params(params, template)
    return params


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    template = load_template()
    try:
        params = load_params(args, template)
        documents = [d for d in yaml.safe_load_all(stdin) if d is not None]
    except ParameterError as exc:
        print(f"discovery-sidecar inject: {exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"discovery-sidecar inject: the input is not YAML or JSON: {exc}", file=sys.stderr)
        return 2
    total = 0
    for index, document in enumerate(documents, 1):
        if not isinstance(document, dict):
            print(f"discovery-sidecar inject: document {index} is not an object", file=sys.stderr)
            return 2
        try:
            total += inject_document(document, params, template)
        except ParameterError as exc:
            print(f"discovery-sidecar inject: {exc}", file=sys.stderr)
            return 2
    stdout.write(yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True))
    print(f"discovery-sidecar inject: added the sidecar to {total} pod template(s)", file=sys.stderr)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        metavar="FILE",
        help="the injection parameters: a SidecarInjection object as the chart or manifests/components/injection "
        "install it (a ConfigMap with the same data is accepted too)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one parameter (repeatable): image, imagePullPolicy, cpuRequest, ..., or a setting's default, "
        "e.g. --set watch=always",
    )
