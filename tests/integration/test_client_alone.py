"""The client distribution installs alone, from the lock, and follows a real sidecar.

A main container that only talks to its sidecar installs ``discovery-sidecar-client``: this makes a fresh
venv with nothing but that (its dependencies exactly as ``uv.lock`` pins them, by hash), checks that the
Kubernetes client, structlog and the sidecar itself stayed out, then runs the README's five-line use in it
against a real sidecar on the real control plane, and compares what it printed with the API server's truth.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

from devcluster.build import ROOT, uv_binary
from devcluster.objects import Cluster
from devcluster.waiting import wait_for
from tests.conftest import Sidecars
from tests.integration.test_peer_stream import SERVICE, World, truth

pytestmark = pytest.mark.integration

CLIENT_DIR = ROOT / "clients" / "python"

# The README's example, bounded: it stops at the first update that shows the expected peers (or after 30 s).
PROGRAM = """
import json, sys, time
from discovery_client import DiscoveryClient, make_filter

expected, deadline = set(json.loads(sys.argv[2])), time.monotonic() + 30
with DiscoveryClient(sys.argv[1]) as client:
    for update in client.watch(make_filter(selector="role=prefill")):
        names = {p.name: p.state for p in update.peers.values()}
        if set(names) == expected or time.monotonic() > deadline:
            print(json.dumps({"kind": update.kind, "peers": names}))
            break
"""


def _run(argv: list[str], **kwargs: object) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return str(result.stdout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A venv holding the client alone, installed from the lock's pins (with hashes), not from the workspace."""
    work = tmp_path_factory.mktemp("client-alone")
    uv = str(uv_binary())
    requirements = work / "requirements.txt"
    _run(
        [uv, "export", "--frozen", "--package", "discovery-sidecar-client", "--no-emit-workspace"]
        + ["--format", "requirements-txt", "--output-file", str(requirements)],
        cwd=ROOT,
    )
    venv = work / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run(
        [uv, "venv", "--quiet", "--python", base_python, str(venv)],
        env={"UV_PYTHON_DOWNLOADS": "never", "PATH": "/usr/bin:/bin"},
    )
    python = str(venv / "bin" / "python")
    _run([uv, "pip", "install", "--quiet", "--python", python, "--require-hashes", "-r", str(requirements)])
    _run([uv, "pip", "install", "--quiet", "--python", python, "--no-deps", str(CLIENT_DIR)])
    return venv


def test_the_client_installs_with_only_grpcio_and_protobuf(client_venv: pathlib.Path) -> None:
    listing = json.loads(
        _run([str(uv_binary()), "pip", "list", "--python", str(client_venv / "bin" / "python"), "--format", "json"])
    )
    installed = {item["name"].lower() for item in listing}
    assert {"discovery-sidecar-client", "grpcio", "protobuf"} <= installed, installed
    assert not installed & {"kubernetes", "structlog", "discovery-sidecar", "grpcio-tools", "prometheus-client"}, (
        installed
    )
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    assert {i["name"].lower(): i["version"] for i in listing if i["name"].lower() in locked} == {
        name: locked[name] for name in installed if name in locked
    }, "the client venv holds other versions than uv.lock pins"
    modules = _run(
        [
            str(client_venv / "bin" / "python"),
            "-c",
            "import sys, discovery_client; print(' '.join(sorted(sys.modules)))",
        ],
        cwd="/",
    ).split()
    assert not [m for m in modules if m.split(".")[0] in ("sidecar", "kubernetes", "structlog")], modules


def test_the_readme_example_follows_a_real_sidecar(
    client_venv: pathlib.Path, namespace: str, cluster: Cluster, sidecars: Sidecars
) -> None:
    world = World(cluster, namespace, sidecars)
    world.worker("prefill-0")
    world.worker("prefill-1")
    world.worker("decode-0", role="decode")
    expected = {"prefill-0": "PEER_STATE_READY", "prefill-1": "PEER_STATE_READY"}
    wait_for(
        lambda: {k: v for k, v in truth(cluster, namespace).items() if k.startswith("prefill")} == expected,
        45,
        what=f"the API server shows {expected} ready in {SERVICE}",
    )
    out = _run(
        [str(client_venv / "bin" / "python"), "-c", PROGRAM, world.observer.target, json.dumps(sorted(expected))],
        cwd="/",
    )
    printed = json.loads(out.strip().splitlines()[-1])
    states = {1: "PEER_STATE_READY", 2: "PEER_STATE_DRAINING"}
    assert {name: states.get(state, state) for name, state in printed["peers"].items()} == expected, printed
