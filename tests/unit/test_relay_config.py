"""The relay's settings (``load_relay_settings``) and a sidecar's ``DISCOVERY_UPSTREAM``: every problem named."""

from __future__ import annotations

import pathlib

import pytest

from sidecar.app.config import ConfigError, load_relay_settings, load_settings, parse_upstream
from sidecar.kube.settings import KubeSettings
from sidecar.peers.ports import ListenAddress

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pem(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tls.crt"
    path.write_text(PEM)
    return path


def relay_env(pem: pathlib.Path) -> dict[str, str]:
    return {
        "POD_NAMESPACE": "discovery",
        "DISCOVERY_NAMESPACES": "a,b",
        "DISCOVERY_SERVICE_NAME": "workers",
        "DISCOVERY_RELAY_TLS_CERT": str(pem),
        "DISCOVERY_RELAY_TLS_KEY": str(pem),
        "DISCOVERY_PODINFO_DIR": str(pem.parent / "none"),
    }


def test_a_relay_needs_no_pod_identity_and_listens_everywhere(pem: pathlib.Path) -> None:
    settings = load_relay_settings(environ=relay_env(pem))
    assert settings.listen == ListenAddress("0.0.0.0", 50052)
    assert settings.access_ttl == 30
    assert isinstance(settings.kube, KubeSettings) and settings.kube.namespaces == ("a", "b")
    assert settings.tls.cert == str(pem)


def test_a_relay_without_namespaces_watches_its_own(pem: pathlib.Path) -> None:
    env = relay_env(pem)
    del env["DISCOVERY_NAMESPACES"]
    settings = load_relay_settings(environ=env)
    assert isinstance(settings.kube, KubeSettings) and settings.kube.namespaces == ("discovery",)


def test_a_relay_reports_every_problem_at_once(pem: pathlib.Path) -> None:
    env = relay_env(pem)
    del env["DISCOVERY_RELAY_TLS_KEY"]
    del env["DISCOVERY_SERVICE_NAME"]
    env["DISCOVERY_RELAY_TLS_CERT"] = str(pem.parent / "missing.crt")
    env["DISCOVERY_RELAY_ACCESS_TTL"] = "soon"
    with pytest.raises(ConfigError) as info:
        load_relay_settings(environ=env)
    text = str(info.value)
    for fragment in (
        "DISCOVERY_RELAY_TLS_KEY (--relay-tls-key) is not set",
        "DISCOVERY_RELAY_TLS_CERT (--relay-tls-cert): cannot read",
        "DISCOVERY_RELAY_ACCESS_TTL (--relay-access-ttl)",
        "DISCOVERY_SERVICE_NAME",
    ):
        assert fragment in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay.discovery.svc:50052", (("relay.discovery.svc", 50052),)),
        ("a:1, b:2", (("a", 1), ("b", 2))),
        ("[::1]:50052", (("::1", 50052),)),
    ],
)
def test_upstream_targets(text: str, expected: tuple[tuple[str, int], ...]) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize("text", ["relay", "relay:0", "relay:99999", " , "])
def test_bad_upstream_targets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(text)


def sidecar_env(pem: pathlib.Path) -> dict[str, str]:
    return {
        "POD_NAME": "w-0",
        "POD_NAMESPACE": "a",
        "POD_UID": "u",
        "DISCOVERY_UPSTREAM": "relay.discovery.svc:50052",
        "DISCOVERY_UPSTREAM_CA": str(pem),
        "DISCOVERY_PODINFO_DIR": str(pem.parent / "none"),
    }


def test_a_sidecar_following_a_relay_needs_no_readiness_settings(pem: pathlib.Path) -> None:
    settings = load_settings(environ=sidecar_env(pem))
    assert settings.upstream is not None and settings.upstream.targets == (("relay.discovery.svc", 50052),)


def test_an_upstream_needs_its_ca_and_the_kubernetes_backend(pem: pathlib.Path) -> None:
    env = sidecar_env(pem)
    del env["DISCOVERY_UPSTREAM_CA"]
    env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS="http://127.0.0.1:2379")
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert "DISCOVERY_UPSTREAM_CA (--upstream-ca) is not set" in str(info.value)
    assert "a relay serves Kubernetes peers" in str(info.value)


def test_a_ca_without_an_upstream_is_a_mistake(pem: pathlib.Path) -> None:
    env = sidecar_env(pem)
    del env["DISCOVERY_UPSTREAM"]
    env["DISCOVERY_SERVICE_NAME"] = "workers"
    with pytest.raises(ConfigError, match="the relay to follow"):
        load_settings(environ=env)
