"""Tests for sidecar.app.config: env/flag/podinfo resolution and validation, all problems reported at once."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.app.config import (
    OPTIONS,
    UNIX_PATH_MAX,
    ConfigError,
    Settings,
    add_arguments,
    load_settings,
)
from sidecar.core.selectors import parse_selector, selector_from_labels
from sidecar.core.smg_manifest import SmgRoles
from sidecar.core.workers import ModelIdFrom, WorkerPolicy
from sidecar.etcd.settings import EtcdSettings
from sidecar.kube.settings import SERVICE_NAME_LABEL, KubeSettings
from sidecar.kube.sources import watch_targets
from sidecar.peers.options import parse_duration
from sidecar.peers.ports import ListenAddress


@pytest.fixture
def podinfo(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "podinfo"
    directory.mkdir()
    return directory


@pytest.fixture
def env(podinfo: pathlib.Path) -> dict[str, str]:
    return {
        "POD_NAME": "worker-0",
        "POD_NAMESPACE": "ns",
        "POD_UID": "uid-1",
        "DISCOVERY_SERVICE_NAME": "workers",
        "DISCOVERY_PODINFO_DIR": str(podinfo),
    }


def load(environ: dict[str, str], argv: list[str] | None = None) -> Settings:
    args = None
    if argv is not None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(argv)
    return load_settings(args=args, environ=environ)


def kube(s: Settings) -> KubeSettings:
    """The Kubernetes backend's own settings (the default backend)."""
    assert isinstance(s.backend_settings, KubeSettings)
    return s.backend_settings


def etcd(s: Settings) -> EtcdSettings | None:
    """The etcd backend's own settings, or None on another backend."""
    return s.backend_settings if isinstance(s.backend_settings, EtcdSettings) else None


def problems(environ: dict[str, str], argv: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(environ, argv)
    return str(info.value)


def test_minimal_configuration_and_defaults(env: dict[str, str]) -> None:
    s = load(env)
    assert (s.identity.name, s.identity.namespace, s.identity.uid) == ("worker-0", "ns", "uid-1")
    assert kube(s).endpointslice_selector == selector_from_labels({SERVICE_NAME_LABEL: "workers"})
    assert s.grpc_listen == ListenAddress(host="127.0.0.1", port=50051)
    assert s.http_listen == ListenAddress(host="0.0.0.0", port=8090)
    assert s.initial_metadata == {}
    assert s.pod_labels == {}
    assert kube(s).kubeconfig is None
    assert (s.watch_silence_timeout, s.request_timeout, s.backoff_max, s.shutdown_timeout) == (90, 15, 30, 20)
    assert s.history_size == 10000
    assert kube(s).field_manager == "discovery-sidecar"
    assert (s.log_format, s.log_level) == ("auto", "info")
    assert s.raw["POD_NAME"] == "worker-0"


def test_missing_identity_is_reported_together(env: dict[str, str]) -> None:
    for name in ("POD_NAME", "POD_NAMESPACE", "POD_UID"):
        del env[name]
    text = problems(env)
    for name, flag in (("POD_NAME", "--pod-name"), ("POD_NAMESPACE", "--pod-namespace"), ("POD_UID", "--pod-uid")):
        assert f"{name} ({flag}) is not set" in text
    assert "downward API" in text


def test_blank_env_counts_as_unset(env: dict[str, str]) -> None:
    env["POD_UID"] = "   "
    assert "POD_UID (--pod-uid) is not set" in problems(env)


def test_podinfo_files_win_over_env(env: dict[str, str], podinfo: pathlib.Path) -> None:
    (podinfo / "pod_name").write_text("from-file-0\n")
    (podinfo / "pod_uid").write_text("file-uid")
    (podinfo / "pod_namespace").write_text("")  # empty file: falls back to the env var
    s = load(env)
    assert s.identity.name == "from-file-0"
    assert s.identity.uid == "file-uid"
    assert s.identity.namespace == "ns"


def test_podinfo_files_alone_suffice(env: dict[str, str], podinfo: pathlib.Path) -> None:
    for name in ("POD_NAME", "POD_NAMESPACE", "POD_UID"):
        del env[name]
    (podinfo / "pod_name").write_text("w")
    (podinfo / "pod_namespace").write_text("n")
    (podinfo / "pod_uid").write_text("u")
    assert load(env).identity == load({**env, "POD_NAME": "x", "POD_NAMESPACE": "y", "POD_UID": "z"}).identity
    assert (load(env).identity.name, load(env).identity.uid) == ("w", "u")


def test_flags_win_over_everything(env: dict[str, str], podinfo: pathlib.Path) -> None:
    (podinfo / "pod_name").write_text("from-file")
    s = load(env, ["--pod-name", "from-flag", "--grpc-listen", "127.0.0.1:1234"])
    assert s.identity.name == "from-flag"
    assert s.grpc_listen.port == 1234


def test_pod_labels_from_env_and_from_labels_file(env: dict[str, str], podinfo: pathlib.Path) -> None:
    assert load({**env, "DISCOVERY_POD_LABELS": "role=decode, tier=a"}).pod_labels == {"role": "decode", "tier": "a"}
    # the downward-API labels file (k="v" per line) is the default
    (podinfo / "labels").write_text('app="dynamo"\nrole="prefill"\n')
    assert load(env).pod_labels == {"app": "dynamo", "role": "prefill"}
    # an explicit setting wins over that default
    assert load({**env, "DISCOVERY_POD_LABELS": "role=decode"}).pod_labels == {"role": "decode"}


def test_bad_pod_labels(env: dict[str, str]) -> None:
    assert "DISCOVERY_POD_LABELS (--pod-labels)" in problems({**env, "DISCOVERY_POD_LABELS": "novalue"})
    assert "DISCOVERY_POD_LABELS" in problems({**env, "DISCOVERY_POD_LABELS": "bad key!=x"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ListenAddress(host="127.0.0.1", port=50051)),
        ("localhost:7000", ListenAddress(host="127.0.0.1", port=7000)),
        (":7000", ListenAddress(host="127.0.0.1", port=7000)),
        ("127.0.0.2:1", ListenAddress(host="127.0.0.2", port=1)),
        ("[::1]:7000", ListenAddress(host="::1", port=7000)),
        ("unix:///run/discovery/api.sock", ListenAddress(unix_path="/run/discovery/api.sock")),
    ],
)
def test_grpc_listen_accepted(env: dict[str, str], text: str, expected: ListenAddress) -> None:
    assert load({**env, "DISCOVERY_GRPC_LISTEN": text}).grpc_listen == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0.0.0.0:50051", "loopback"),
        ("10.1.2.3:50051", "loopback"),
        ("[::]:50051", "loopback"),
        ("example.com:50051", "loopback IP address"),
        ("unix://relative.sock", "absolute path"),
        ("127.0.0.1:70000", "out of range"),
        ("127.0.0.1", "host:port"),
        ("nonsense", "host:port"),
    ],
)
def test_grpc_listen_refused(env: dict[str, str], text: str, fragment: str) -> None:
    text_out = problems({**env, "DISCOVERY_GRPC_LISTEN": text})
    assert "DISCOVERY_GRPC_LISTEN (--grpc-listen)" in text_out
    assert fragment in text_out


def test_a_unix_socket_path_up_to_the_kernels_limit_is_accepted(env: dict[str, str]) -> None:
    path = "/" + "s" * (UNIX_PATH_MAX - 1)
    assert load({**env, "DISCOVERY_GRPC_LISTEN": f"unix://{path}"}).grpc_listen == ListenAddress(unix_path=path)


@pytest.mark.parametrize("path", ["/" + "s" * UNIX_PATH_MAX, "/" + "é" * 54])
def test_a_unix_socket_path_over_the_kernels_limit_is_refused_at_start_up(env: dict[str, str], path: str) -> None:
    """108 bytes (ASCII, or 54 two-byte characters and the slash, 109): refused with the setting, the limit
    and the length, rather than by gRPC when the server binds, after start-up."""
    text_out = problems({**env, "DISCOVERY_GRPC_LISTEN": f"unix://{path}"})
    assert "DISCOVERY_GRPC_LISTEN (--grpc-listen)" in text_out
    assert f"longer than the kernel's limit of {UNIX_PATH_MAX}" in text_out
    assert f"is {len(path.encode())} bytes" in text_out


def test_grpc_target_spelling() -> None:
    assert ListenAddress(host="::1", port=5).grpc_target == "[::1]:5"
    assert ListenAddress(host="127.0.0.1", port=5).grpc_target == "127.0.0.1:5"
    assert str(ListenAddress(unix_path="/x.sock")) == "unix:///x.sock"


def test_http_listen(env: dict[str, str]) -> None:
    assert load({**env, "DISCOVERY_HTTP_LISTEN": "off"}).http_listen is None
    assert load({**env, "DISCOVERY_HTTP_LISTEN": "10.0.0.1:9090"}).http_listen == ListenAddress("10.0.0.1", 9090)
    assert load({**env, "DISCOVERY_HTTP_LISTEN": ":9090"}).http_listen == ListenAddress("0.0.0.0", 9090)
    assert "DISCOVERY_HTTP_LISTEN (--http-listen)" in problems({**env, "DISCOVERY_HTTP_LISTEN": "9090"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("30s", 30), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("1.5m", 90), (" 5s ", 5)],
)
def test_durations(env: dict[str, str], text: str, seconds: float) -> None:
    assert load({**env, "DISCOVERY_REQUEST_TIMEOUT": text}).request_timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "-1s", "10x", "s", "1d", "ten"])
def test_bad_durations(env: dict[str, str], text: str) -> None:
    out = problems({**env, "DISCOVERY_WATCH_SILENCE_TIMEOUT": text})
    assert "DISCOVERY_WATCH_SILENCE_TIMEOUT (--watch-silence-timeout)" in out
    assert repr(text) in out


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**6), st.sampled_from([("", 1), ("s", 1), ("ms", 0.001), ("m", 60), ("h", 3600)]))
def test_parse_duration_property(number: int, unit: tuple[str, float]) -> None:
    assert parse_duration(f"{number}{unit[0]}") == pytest.approx(number * unit[1])


@pytest.mark.parametrize("text", ["0", "-5", "ten", "1.5"])
def test_bad_history_size(env: dict[str, str], text: str) -> None:
    assert "DISCOVERY_HISTORY_SIZE (--history-size)" in problems({**env, "DISCOVERY_HISTORY_SIZE": text})


MODEL_CARD = {"type": "Model", "namespace": "ns", "component": "c", "endpoint": "e", "instance_id": 1, "card_json": {}}


def test_metadata_inline(env: dict[str, str]) -> None:
    data = {"model_cards": {"ns/c/e/1": MODEL_CARD}, "endpoints": {}, "custom": 1}
    assert load({**env, "DISCOVERY_METADATA": json.dumps(data)}).initial_metadata == data


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ('{"endpoints": []}', "endpoints must be a JSON object"),
        ('{"model_cards": {"m": {}}}', "the metadata.model_cards['m'].type must be 'Model'"),
        ('{"x": NaN}', "contains nan, which is not a JSON number"),
    ],
)
def test_bad_metadata(env: dict[str, str], text: str, fragment: str) -> None:
    out = problems({**env, "DISCOVERY_METADATA": text})
    assert "DISCOVERY_METADATA (--metadata)" in out
    assert fragment in out


def test_metadata_file(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"model_cards": {"ns/c/e/1": MODEL_CARD}}))
    assert load({**env, "DISCOVERY_METADATA_FILE": str(path)}).initial_metadata == {
        "model_cards": {"ns/c/e/1": MODEL_CARD}
    }
    out = problems({**env, "DISCOVERY_METADATA_FILE": str(tmp_path / "missing.json")})
    assert "DISCOVERY_METADATA_FILE (--metadata-file)" in out and "cannot read" in out
    path.write_text("[]")
    assert "must be a JSON object" in problems({**env, "DISCOVERY_METADATA_FILE": str(path)})


def test_metadata_and_metadata_file_together(env: dict[str, str], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "meta.json"
    path.write_text("{}")
    out = problems({**env, "DISCOVERY_METADATA": "{}", "DISCOVERY_METADATA_FILE": str(path)})
    assert "set only one of DISCOVERY_METADATA (--metadata) and DISCOVERY_METADATA_FILE (--metadata-file)" in out


def test_backend(env: dict[str, str]) -> None:
    s = load({**env, "DYN_DISCOVERY_BACKEND": "kubernetes"})
    assert (s.identity.name, s.backend, etcd(s), s.backend == "etcd") == ("worker-0", "kubernetes", None, False)
    out = problems({**env, "DYN_DISCOVERY_BACKEND": "consul"})
    assert "DYN_DISCOVERY_BACKEND (--backend): expected one of kubernetes, etcd" in out and "'consul'" in out


@pytest.fixture
def etcd_env(podinfo: pathlib.Path) -> dict[str, str]:
    """What Dynamo's operator gives an etcd-backed pod: no UID needed, no Service."""
    return {
        "POD_NAME": "worker-0",
        "POD_NAMESPACE": "ns",
        "DYN_DISCOVERY_BACKEND": "etcd",
        "DISCOVERY_PODINFO_DIR": str(podinfo),
    }


class TestEtcdBackend:
    def test_defaults_are_dynamos(self, etcd_env: dict[str, str]) -> None:
        """ETCD_* defaults as Dynamo's runtime reads them; POD_UID and the readiness source are not needed."""
        s = load(etcd_env)
        assert s.backend == "etcd" and etcd(s) is not None
        assert etcd(s).endpoints_text == "http://localhost:2379"
        assert (etcd(s).lease_ttl, etcd(s).startup_connect_timeout) == (30, 120.0)
        assert s.identity.uid == "" and not isinstance(s.backend_settings, KubeSettings)

    def test_flags_win_over_env(self, etcd_env: dict[str, str]) -> None:
        """Every ETCD_* variable has a flag, and flags win as everywhere else."""
        s = load(
            {**etcd_env, "ETCD_ENDPOINTS": "http://a:1", "ETCD_LEASE_TTL": "4"},
            [
                "--etcd-endpoints",
                "http://b:2,http://c:3",
                "--etcd-lease-ttl",
                "6",
                "--etcd-auth-username",
                "u",
                "--etcd-auth-password",
                "p",
            ],
        )
        assert etcd(s) is not None
        assert etcd(s).endpoints_text == "http://b:2,http://c:3"
        assert (etcd(s).lease_ttl, etcd(s).username, etcd(s).password) == (6, "u", "p")

    def test_backend_from_flag(self, env: dict[str, str]) -> None:
        """``--backend etcd`` switches, and then a Service name is refused as meaningless."""
        out = problems(env, ["--backend", "etcd"])
        assert "DISCOVERY_SERVICE_NAME (--service-name) chooses Kubernetes objects" in out

    def test_every_bad_etcd_value_at_once(self, etcd_env: dict[str, str]) -> None:
        """Bad values are a clear start-up error naming variable and flag (Dynamo would fall back silently)."""
        out = problems(
            {
                **etcd_env,
                "ETCD_LEASE_TTL": "ten",
                "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "0",
                "ETCD_ENDPOINTS": "ftp://etcd:2379",
                "ETCD_AUTH_CA": "/no/such/ca.pem",
                "DISCOVERY_POD_SELECTOR": "app=x",
            }
        )
        assert out.startswith("invalid configuration:")
        assert "ETCD_LEASE_TTL (--etcd-lease-ttl): expected a whole number, got 'ten'" in out
        assert "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS (--etcd-startup-connect-timeout)" in out
        assert "ETCD_ENDPOINTS (--etcd-endpoints): 'ftp://etcd:2379' is not an http:// or https:// URL" in out
        assert "ETCD_AUTH_CA (--etcd-auth-ca): expected PEM text" in out
        assert "DISCOVERY_POD_SELECTOR (--pod-selector) chooses Kubernetes objects" in out
        assert out.count("\n  - ") == 5

    def test_half_configured_login_is_refused(self, etcd_env: dict[str, str]) -> None:
        """A user without a password: Dynamo ignores both; the sidecar says so and does not start."""
        out = problems({**etcd_env, "ETCD_AUTH_USERNAME": "root"})
        assert "ETCD_AUTH_USERNAME (--etcd-auth-username) is set without ETCD_AUTH_PASSWORD" in out

    def test_pem_text_or_file(self, etcd_env: dict[str, str], tmp_path: pathlib.Path) -> None:
        """TLS material is PEM text (as Dynamo passes it to from_pem) or a file holding PEM."""
        pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
        path = tmp_path / "ca.pem"
        path.write_text(pem)
        s = load(
            {
                **etcd_env,
                "ETCD_ENDPOINTS": "https://etcd:2379",
                "ETCD_AUTH_CA": str(path),
                "ETCD_AUTH_CLIENT_CERT": pem,
                "ETCD_AUTH_CLIENT_KEY": pem,
            }
        )
        assert etcd(s) is not None and etcd(s).tls and etcd(s).ca_pem == pem.encode()

    def test_etcd_settings_ignored_on_kubernetes(self, env: dict[str, str]) -> None:
        """On the Kubernetes backend ETCD_* are not read (as Dynamo's Kubernetes backend ignores them)."""
        assert etcd(load({**env, "ETCD_LEASE_TTL": "nonsense"})) is None


def test_service_name_and_selector_combine(env: dict[str, str]) -> None:
    s = load({**env, "DISCOVERY_ENDPOINTSLICE_SELECTOR": "tier in (gpu),!canary"})
    selector = kube(s).endpointslice_selector
    assert selector == parse_selector(f"{SERVICE_NAME_LABEL}=workers,tier in (gpu),!canary")
    assert selector.matches({SERVICE_NAME_LABEL: "workers", "tier": "gpu"})
    assert not selector.matches({SERVICE_NAME_LABEL: "workers", "tier": "cpu"})
    assert not selector.matches({SERVICE_NAME_LABEL: "other", "tier": "gpu"})
    assert not selector.matches({"tier": "gpu"})


def test_selector_alone(env: dict[str, str]) -> None:
    del env["DISCOVERY_SERVICE_NAME"]
    s = load({**env, "DISCOVERY_ENDPOINTSLICE_SELECTOR": "app=dynamo"})
    assert kube(s).endpointslice_selector == parse_selector("app=dynamo")


def test_neither_service_nor_selector(env: dict[str, str]) -> None:
    del env["DISCOVERY_SERVICE_NAME"]
    out = problems(env)
    assert "DISCOVERY_SERVICE_NAME (--service-name)" in out
    assert "DISCOVERY_ENDPOINTSLICE_SELECTOR (--endpointslice-selector)" in out


def test_empty_selector_selects_everything_and_is_refused(env: dict[str, str]) -> None:
    del env["DISCOVERY_SERVICE_NAME"]
    out = problems(env, ["--endpointslice-selector", ""])
    assert "selects every EndpointSlice" in out


def test_bad_selector_and_bad_service_name(env: dict[str, str]) -> None:
    out = problems({**env, "DISCOVERY_ENDPOINTSLICE_SELECTOR": "a in b"})
    assert "DISCOVERY_ENDPOINTSLICE_SELECTOR (--endpointslice-selector): invalid label selector" in out
    out = problems({**env, "DISCOVERY_SERVICE_NAME": "not a valid name!"})
    assert "DISCOVERY_SERVICE_NAME (--service-name): not a valid Service name" in out


@pytest.mark.parametrize(("env_name", "value"), [("DISCOVERY_LOG_FORMAT", "xml"), ("DISCOVERY_LOG_LEVEL", "loud")])
def test_bad_choices(env: dict[str, str], env_name: str, value: str) -> None:
    assert env_name in problems({**env, env_name: value})


def test_choices_are_case_insensitive(env: dict[str, str]) -> None:
    s = load({**env, "DISCOVERY_LOG_FORMAT": "JSON", "DISCOVERY_LOG_LEVEL": "Debug"})
    assert (s.log_format, s.log_level) == ("json", "debug")


def test_every_problem_in_one_error(env: dict[str, str]) -> None:
    bad = {
        "POD_NAME": "",
        "DISCOVERY_PODINFO_DIR": env["DISCOVERY_PODINFO_DIR"],
        "POD_NAMESPACE": "ns",
        "POD_UID": "u",
        "DISCOVERY_GRPC_LISTEN": "0.0.0.0:1",
        "DISCOVERY_REQUEST_TIMEOUT": "soon",
        "DISCOVERY_METADATA": "{",
        "DYN_DISCOVERY_BACKEND": "consul",
        "DISCOVERY_HISTORY_SIZE": "0",
    }
    out = problems(bad)
    for name in (
        "POD_NAME",
        "DISCOVERY_GRPC_LISTEN",
        "DISCOVERY_REQUEST_TIMEOUT",
        "DISCOVERY_METADATA",
        "DYN_DISCOVERY_BACKEND",
        "DISCOVERY_HISTORY_SIZE",
        "DISCOVERY_SERVICE_NAME",
    ):
        assert name in out
    assert out.startswith("invalid configuration:")
    assert out.count("\n  - ") == 7


def test_environ_defaults_to_process_environment(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POD_NAME", "from-os-environ")
    assert load_settings().identity.name == "from-os-environ"


def test_option_table_is_consistent() -> None:
    envs = [o.env for o in OPTIONS]
    flags = [o.flag for o in OPTIONS]
    assert len(set(envs)) == len(envs) and len(set(flags)) == len(flags)
    for required in (
        "POD_NAME",
        "POD_NAMESPACE",
        "POD_UID",
        "DISCOVERY_SERVICE_NAME",
        "DISCOVERY_ENDPOINTSLICE_SELECTOR",
        "DISCOVERY_GRPC_LISTEN",
        "DISCOVERY_HTTP_LISTEN",
        "DISCOVERY_METADATA",
        "DISCOVERY_METADATA_FILE",
        "DYN_DISCOVERY_BACKEND",
        "KUBECONFIG",
    ):
        assert required in envs
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "Env: POD_NAME" in parser.format_help()


class TestPodLabelDiscovery:
    def test_pod_selector_replaces_the_service(self, env: dict[str, str]) -> None:
        """With DISCOVERY_POD_SELECTOR, Pods define readiness: no Service, no EndpointSlice selector."""
        del env["DISCOVERY_SERVICE_NAME"]
        s = load({**env, "DISCOVERY_POD_SELECTOR": "app=sglang-worker,role in (prefill,decode)"})
        assert kube(s).pod_selector == parse_selector("app=sglang-worker,role in (prefill,decode)")
        assert kube(s).endpointslice_selector is None
        assert [(t.source.name, t.namespace, t.label_selector) for t in watch_targets(kube(s))] == [
            ("pods", "ns", "app=sglang-worker,role in (decode,prefill)"),  # canonical form
            ("dynamoworkermetadatas", "ns", ""),
        ]

    def test_pod_selector_with_a_service_is_refused(self, env: dict[str, str]) -> None:
        """Two readiness sources at once would be ambiguous: say which settings clash."""
        out = problems({**env, "DISCOVERY_POD_SELECTOR": "app=w"})
        assert "set either DISCOVERY_POD_SELECTOR" in out and "not both" in out

    @pytest.mark.parametrize(("text", "fragment"), [("", "selects every Pod"), ("app in (", "invalid label selector")])
    def test_bad_pod_selector(self, env: dict[str, str], text: str, fragment: str) -> None:
        """An empty or malformed selector is a start-up error naming the variable."""
        del env["DISCOVERY_SERVICE_NAME"]
        out = problems({**env, "DISCOVERY_POD_SELECTOR": text}, ["--pod-selector", text] if not text else None)
        assert fragment in out and "DISCOVERY_POD_SELECTOR" in out

    def test_nothing_defines_readiness(self, env: dict[str, str]) -> None:
        """Without a Service, an EndpointSlice selector or a Pod selector there are no peers to find."""
        del env["DISCOVERY_SERVICE_NAME"]
        assert "DISCOVERY_POD_SELECTOR (--pod-selector): they say what defines peer readiness" in problems(env)


class TestNamespaces:
    def test_default_is_the_pods_own(self, env: dict[str, str]) -> None:
        """Unset: the pod's namespace, one watch per source, named as before."""
        s = load(env)
        assert kube(s).namespaces == ("ns",)
        assert [t.name for t in watch_targets(kube(s))] == ["endpointslices", "dynamoworkermetadatas"]

    def test_a_list_gives_one_watch_per_namespace_and_source(self, env: dict[str, str]) -> None:
        """Each namespace's watch is its own source (its relist must not touch another namespace)."""
        s = load({**env, "DISCOVERY_NAMESPACES": " a, b,a "})
        assert kube(s).namespaces == ("a", "b")
        assert [t.name for t in watch_targets(kube(s))] == [
            "endpointslices@a",
            "dynamoworkermetadatas@a",
            "endpointslices@b",
            "dynamoworkermetadatas@b",
        ]

    def test_star_is_one_cluster_wide_watch(self, env: dict[str, str]) -> None:
        """``*`` lists and watches every namespace in one request per source."""
        s = load({**env, "DISCOVERY_NAMESPACES": "*"})
        targets = watch_targets(kube(s))
        assert kube(s).namespaces == ("",)
        assert [t.collection for t in targets] == [
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/apis/nvidia.com/v1alpha1/dynamoworkermetadatas",
        ]

    def test_bad_namespace_name(self, env: dict[str, str]) -> None:
        """A name Kubernetes would refuse is a start-up error, not a watch that 404s forever."""
        out = problems({**env, "DISCOVERY_NAMESPACES": "ok,Not_OK"})
        assert "'Not_OK' is not a namespace name" in out


class TestWorkersAndMetadata:
    def test_defaults(self, env: dict[str, str]) -> None:
        """Metadata required, no worker port, http, no model id, no SMG manifest."""
        s = load(env)
        assert kube(s).require_metadata is True
        assert kube(s).workers == WorkerPolicy(port=None, protocol="http", model_id_from=None)
        assert s.smg_manifest is None

    def test_given(self, env: dict[str, str]) -> None:
        s = load(
            {
                **env,
                "DISCOVERY_REQUIRE_METADATA": "False",
                "DISCOVERY_WORKER_PORT": "8000",
                "DISCOVERY_WORKER_PROTOCOL": "GRPC",
                "DISCOVERY_MODEL_ID_FROM": "label:model",
            }
        )
        assert kube(s).require_metadata is False
        assert kube(s).workers == WorkerPolicy(port=8000, protocol="grpc", model_id_from=ModelIdFrom("label", "model"))

    def test_bad_values_are_reported_together(self, env: dict[str, str]) -> None:
        out = problems(
            {
                **env,
                "DISCOVERY_REQUIRE_METADATA": "maybe",
                "DISCOVERY_WORKER_PORT": "0",
                "DISCOVERY_WORKER_PROTOCOL": "tcp",
                "DISCOVERY_MODEL_ID_FROM": "label:",
            }
        )
        assert "DISCOVERY_REQUIRE_METADATA (--require-metadata): expected true or false" in out
        assert "DISCOVERY_WORKER_PORT (--worker-port): expected a port in 1-65535" in out
        assert "DISCOVERY_WORKER_PROTOCOL (--worker-protocol): expected one of http, grpc" in out
        assert "DISCOVERY_MODEL_ID_FROM (--model-id-from): label: needs a key" in out


class TestSmgManifest:
    def test_roles_and_path(self, env: dict[str, str], tmp_path: pathlib.Path) -> None:
        """Selectors in Kubernetes syntax or SMG's space-separated one."""
        s = load(
            {
                **env,
                "DISCOVERY_SMG_MANIFEST": str(tmp_path / "workers.json"),
                "DISCOVERY_SMG_PREFILL_SELECTOR": "app=sglang role=prefill",
                "DISCOVERY_SMG_DECODE_SELECTOR": "app=sglang,role=decode",
            }
        )
        assert s.smg_manifest is not None
        assert s.smg_manifest.path == tmp_path / "workers.json"
        assert s.smg_manifest.roles == SmgRoles(
            prefill=parse_selector("app=sglang,role=prefill"), decode=parse_selector("app=sglang,role=decode")
        )

    def test_a_path_without_selectors_and_selectors_without_a_path(self, env: dict[str, str]) -> None:
        assert "no peers are selected for it" in problems({**env, "DISCOVERY_SMG_MANIFEST": "/tmp/w.json"})
        out = problems({**env, "DISCOVERY_SMG_SELECTOR": "app=w"})
        assert "DISCOVERY_SMG_MANIFEST (--smg-manifest) (where to write it) is not set" in out

    @pytest.mark.parametrize(
        ("path", "fragment"),
        [("relative.json", "absolute file path"), ("/no/such/dir/w.json", "mount the volume"), ("/tmp", "directory")],
    )
    def test_bad_paths(self, env: dict[str, str], path: str, fragment: str) -> None:
        out = problems({**env, "DISCOVERY_SMG_MANIFEST": path, "DISCOVERY_SMG_SELECTOR": "app=w"})
        assert fragment in out and "DISCOVERY_SMG_MANIFEST" in out

    @pytest.mark.parametrize("text", ["app in (", "role=a b"])
    def test_bad_selectors(self, env: dict[str, str], text: str) -> None:
        """A selector SMG's flag would not take either is a start-up error naming the variable."""
        out = problems({**env, "DISCOVERY_SMG_MANIFEST": "/tmp/w.json", "DISCOVERY_SMG_DECODE_SELECTOR": text})
        assert "DISCOVERY_SMG_DECODE_SELECTOR (--smg-decode-selector): invalid label selector" in out

    def test_a_manifest_with_watch_never_is_refused(self, env: dict[str, str], tmp_path: pathlib.Path) -> None:
        """The manifest lists peers, which DISCOVERY_WATCH=never never watches: a start-up error naming both.

        (The check read DISCOVERY_WATCH before it was parsed, so it never fired until the modes were parsed
        once, into enums.)"""
        manifest = {"DISCOVERY_SMG_MANIFEST": str(tmp_path / "w.json"), "DISCOVERY_SMG_SELECTOR": "app=w"}
        out = problems({**env, **manifest, "DISCOVERY_WATCH": "never"})
        assert "DISCOVERY_SMG_MANIFEST (--smg-manifest) lists peers, but DISCOVERY_WATCH (--watch) is 'never'" in out
        assert load({**env, **manifest, "DISCOVERY_WATCH": "always"}).smg_manifest is not None
