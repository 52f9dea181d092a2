"""The injection template (``template.yaml``): what the sidecar adds to a pod, read once, typed.

Both ways in read this one file: the MutatingAdmissionPolicy is generated from it (``policy.py``) and
``discovery-sidecar inject`` applies it in Python (``pod.py``), so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml


class TemplateError(ValueError):
    """The template file itself is malformed (a packaging or editing mistake, not a user error)."""


@dataclass(frozen=True)
class Setting:
    """A sidecar variable a pod may set by annotation (``{annotationPrefix}{key}``)."""

    key: str  # the annotation's suffix and the parameter object's key for its default
    env: str  # the sidecar's environment variable
    default: str  # the parameter's default ("" leaves the variable out)
    group: str  # settings that exclude each other: one set by the pod drops the others' defaults
    kubernetes_only: bool  # the default is left out on the etcd backend (the sidecar refuses it there)


@dataclass(frozen=True)
class Template:
    """``template.yaml`` as data; ``sidecar`` and ``volumes`` keep ``{param: KEY}`` placeholders."""

    label: str
    annotation_prefix: str
    container_name: str
    service_account_token_path: str
    parameters: Mapping[str, str]
    settings: tuple[Setting, ...]
    app_container_env: tuple[Mapping[str, Any], ...]
    sidecar: Mapping[str, Any]
    volumes: tuple[Mapping[str, Any], ...]

    def annotation(self, setting: Setting) -> str:
        return self.annotation_prefix + setting.key

    def default_params(self) -> dict[str, str]:
        """The parameter object's data as shipped: the parameters, then each setting's default."""
        return {**self.parameters, **{s.key: s.default for s in self.settings}}

    @property
    def backend_setting(self) -> Setting:
        return next(s for s in self.settings if s.env == "DYN_DISCOVERY_BACKEND")


def _setting(raw: Mapping[str, Any]) -> Setting:
    return Setting(
        key=str(raw["key"]),
        env=str(raw["env"]),
        default=str(raw.get("default", "")),
        group=str(raw.get("group", "")),
        kubernetes_only=bool(raw.get("kubernetesOnly", False)),
    )


def parse_template(text: str) -> Template:
    raw = yaml.safe_load(text)
    try:
        template = Template(
            label=str(raw["label"]),
            annotation_prefix=str(raw["annotationPrefix"]),
            container_name=str(raw["containerName"]),
            service_account_token_path=str(raw["serviceAccountTokenPath"]),
            parameters={str(k): str(v) for k, v in raw["parameters"].items()},
            settings=tuple(_setting(s) for s in raw["settings"]),
            app_container_env=tuple(raw["appContainerEnv"]),
            sidecar=raw["sidecar"],
            volumes=tuple(raw["volumes"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise TemplateError(f"injection template: missing or malformed {exc}") from exc
    if template.sidecar.get("name") != template.container_name:
        raise TemplateError("injection template: sidecar.name must equal containerName")
    keys = [s.key for s in template.settings]
    if len(set(keys)) != len(keys) or set(keys) & set(template.parameters):
        raise TemplateError("injection template: setting keys must be unique and differ from the parameters")
    return template


@functools.cache
def load_template() -> Template:
    """The template shipped in this package."""
    text = importlib.resources.files("sidecar.app.injection").joinpath("template.yaml").read_text()
    return parse_template(text)
