"""Dynamo's etcd environment variables, read as Dynamo reads them (and a little more, never less)."""

from __future__ import annotations

import pathlib

import pytest

from sidecar.etcd.settings import Endpoint, EtcdSettings, EtcdSettingsError

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
TLS = {"ETCD_AUTH_CA": PEM, "ETCD_AUTH_CLIENT_CERT": PEM, "ETCD_AUTH_CLIENT_KEY": PEM.replace("CERTIFICATE", "KEY")}


def test_defaults_are_dynamos() -> None:
    settings, warnings = EtcdSettings.from_env({})
    assert settings.endpoints == (Endpoint("localhost", 2379, False),)
    assert (settings.lease_ttl, settings.startup_connect_timeout, settings.username) == (30, 120.0, None)
    assert warnings == []


def test_endpoints_are_comma_separated_urls() -> None:
    settings, _ = EtcdSettings.from_env({"ETCD_ENDPOINTS": "http://a:1, https://b:2,c:3,http://[::1]:4"})
    assert settings.endpoints == (
        Endpoint("a", 1, False),
        Endpoint("b", 2, True),
        Endpoint("c", 3, False),
        Endpoint("::1", 4, False),
    )
    assert settings.endpoints[3].target == "[::1]:4"


@pytest.mark.parametrize("raw", ["", " , ", "ftp://a:1", "http://a:notaport"])
def test_unusable_endpoints_are_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(EtcdSettingsError, match="ETCD_ENDPOINTS"):
        EtcdSettings.from_env({"ETCD_ENDPOINTS": raw})


def test_username_and_password_go_together_or_are_ignored_as_dynamo_does() -> None:
    settings, warnings = EtcdSettings.from_env({"ETCD_AUTH_USERNAME": "u", "ETCD_AUTH_PASSWORD": "p"})
    assert (settings.username, settings.password) == ("u", "p")
    settings, warnings = EtcdSettings.from_env({"ETCD_AUTH_USERNAME": "u"})
    assert settings.username is None and "without ETCD_AUTH_PASSWORD" in warnings[0]
    assert "s3cret" not in repr(EtcdSettings(username="u", password="s3cret"))  # never logged


def test_tls_values_are_pem_text_as_dynamo_passes_them_or_paths(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text(PEM)
    settings, _ = EtcdSettings.from_env({**TLS, "ETCD_AUTH_CA": str(tmp_path / "ca.pem"), "ETCD_ENDPOINTS": "https://e:1"})
    assert settings.ca_pem == PEM.encode() and settings.client_cert_pem == PEM.encode() and settings.tls
    with pytest.raises(EtcdSettingsError, match="ETCD_AUTH_CA: expected PEM text"):
        EtcdSettings.from_env({**TLS, "ETCD_AUTH_CA": "/nonexistent/ca.pem"})


def test_schemes_follow_dynamos_etcd_client() -> None:
    bare, _ = EtcdSettings.from_env({**TLS, "ETCD_ENDPOINTS": "e:1"})
    assert bare.endpoints == (Endpoint("e", 1, True),)  # a bare host:port is TLS with the TLS triple
    with pytest.raises(EtcdSettingsError, match="only supported with https"):
        EtcdSettings.from_env({**TLS, "ETCD_ENDPOINTS": "http://e:1"})
    ca_only, warnings = EtcdSettings.from_env({"ETCD_AUTH_CA": PEM, "ETCD_ENDPOINTS": "http://e:1"})
    assert not ca_only.tls and "ignored" in warnings[0]  # Dynamo ignores an incomplete triple too
    ca_only, warnings = EtcdSettings.from_env({"ETCD_AUTH_CA": PEM, "ETCD_ENDPOINTS": "https://e:1"})
    assert ca_only.tls and ca_only.ca_pem == PEM.encode() and warnings == []
    with pytest.raises(EtcdSettingsError, match="set both"):
        EtcdSettings.from_env({"ETCD_AUTH_CLIENT_CERT": PEM, "ETCD_ENDPOINTS": "https://e:1"})


@pytest.mark.parametrize(("raw", "expected"), [("5", 5), ("0", 30), ("-3", 30), ("ten", 30), (" 7 ", 7)])
def test_lease_ttl_falls_back_to_dynamos_default(raw: str, expected: int) -> None:
    """30 s: what ai-dynamo-runtime 1.6.1 grants when ETCD_LEASE_TTL is unset (measured on a real etcd)."""
    settings, warnings = EtcdSettings.from_env({"ETCD_LEASE_TTL": raw})
    assert settings.lease_ttl == expected
    assert bool(warnings) == (expected == 30)


def test_startup_connect_timeout() -> None:
    assert EtcdSettings.from_env({"ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "45"})[0].startup_connect_timeout == 45.0
    assert EtcdSettings.from_env({"ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "0"})[0].startup_connect_timeout == 120.0
