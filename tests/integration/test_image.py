"""The sidecar's image, built here without Docker (devcluster.image), starts and works as a pod's sidecar.

The image is built from Debian's packages and uv.lock (or reused from ~/.cache: the cold build takes
about a minute and a half), loaded into podman and run as a restricted container: user 65532, read-only
root filesystem, no capabilities. Against the real control plane it registers with a pod-bound token from
the service-account mount (the in-cluster configuration), its CR is owned by its pod, and it serves
WatchPeers on a Unix socket shared with the host; a sidecar from this checkout sees it as a peer and it
sees that one. What is installed in it is exactly uv.lock's runtime part.
"""

from __future__ import annotations

import json
import pathlib
import re
import tomllib
from collections.abc import Iterator

import pytest

from devcluster.build import ROOT
from devcluster.cluster import ControlPlane
from devcluster.dockerfile import load
from devcluster.image import USER_ID, Image, ImageSidecar, ensure_image, launch_image_sidecar, run_in_image
from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.waiting import wait_for
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SERVICE = "workers"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def image() -> Image:
    return ensure_image()


@pytest.fixture
def image_sidecars() -> Iterator[list[ImageSidecar]]:
    started: list[ImageSidecar] = []
    yield started
    for process in started:
        try:
            process.terminate(timeout=15)
        except Exception:  # noqa: BLE001 - teardown must reach every container
            process.kill()
        process.remove()


def test_image_config_is_the_dockerfiles(image: Image) -> None:
    config = image.config()["config"]
    final = load().final
    assert config["User"] == f"{USER_ID}:{USER_ID}" == final.last("USER").args  # type: ignore[union-attr]
    assert config["Entrypoint"] == ["discovery-sidecar"] and config["Cmd"] == ["run"]
    assert config["Labels"]["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert config["Labels"]["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert config["Labels"]["org.opencontainers.image.title"] == "discovery-sidecar"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:") and env["DISCOVERY_LOG_FORMAT"] == "json"
    assert list(config["ExposedPorts"]) == ["8090/tcp"]
    layers = image.manifest()["layers"]
    assert len(layers) == 2, "the Debian base and /opt/venv"
    assert image.info["compressed_bytes"] == sum(layer["size"] for layer in layers)


def test_image_holds_exactly_the_locks_runtime_part(image: Image) -> None:
    assert run_in_image(image, "--version").strip() == f"discovery-sidecar {PYPROJECT['project']['version']}"
    probe = (
        "import importlib.metadata as md, json, os, shutil, sidecar, sys; print(json.dumps({"
        "'uid': os.getuid(), 'prefix': sys.prefix, 'version': sys.version_info[:2], 'sidecar': sidecar.__file__, "
        "'shell': [s for s in ('sh', 'bash', 'apt-get', 'pip', 'uv') if shutil.which(s)], "
        "'dists': {d.metadata['Name'].lower().replace('_', '-'): d.version for d in md.distributions()}}))"
    )
    facts = json.loads(run_in_image(image, "-c", probe, entrypoint="python"))
    assert facts["uid"] == USER_ID and facts["prefix"] == "/opt/venv" and facts["version"] == [3, 11]
    assert facts["sidecar"].startswith("/opt/venv/lib/python3.11/site-packages/")
    assert facts["shell"] == [], "no shell, package manager or installer in the image"
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    drifted = {d: (v, locked.get(d)) for d, v in facts["dists"].items() if locked.get(d) != v}
    assert not drifted, f"installed versions differ from uv.lock (installed, locked): {drifted}"
    dev_only = {re.split(r"[<>=!~ \[;]", r)[0].lower() for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert not dev_only & set(facts["dists"]), f"dev extras in the image: {dev_only & set(facts['dists'])}"
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert re.split(r"[<>=!~ \[;]", requirement)[0].lower() in facts["dists"], requirement


def test_image_runs_as_a_pods_sidecar(
    image: Image,
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    sidecars: Sidecars,
    image_sidecars: list[ImageSidecar],
    tmp_path: pathlib.Path,
) -> None:
    cluster.create_service(namespace, SERVICE, {"app": "w"})
    from_image = cluster.start_pod(namespace, "from-image", {"app": "w", "role": "prefill"})
    from_checkout = cluster.start_pod(namespace, "from-checkout", {"app": "w", "role": "decode"})
    container = launch_image_sidecar(image, control_plane, cluster, from_image, SERVICE, tmp_path / "image")
    image_sidecars.append(container)
    peer = sidecars.start(from_checkout, SERVICE)
    container.wait_ready(90)
    peer.wait_ready()

    # It registered: its CR exists, owned by its pod (the in-cluster token is bound to that pod).
    cr = cluster.get_or_none(WORKER_METADATA.item(namespace, "from-image"))
    assert cr is not None, f"no CR; the container's log:\n{container.log_tail()}"
    assert [(o["kind"], o["name"], o["uid"]) for o in cr["metadata"]["ownerReferences"]] == [
        ("Pod", "from-image", from_image["metadata"]["uid"])
    ]
    assert cr["metadata"]["labels"]["role"] == "prefill", "labels from the downward-API file /etc/podinfo/labels"
    # The process is the image's, as user 65532, not this machine's sidecar.
    status = pathlib.Path(f"/proc/{container.container_pid()}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and set(uids.group(1).split()) == {str(USER_ID)}, status
    assert any(e.get("event") for e in container.log_events()), "the container logs JSON (DISCOVERY_LOG_FORMAT)"

    # It serves WatchPeers on its Unix socket: a snapshot holding its peer; and the peer sees it.
    seen_by_image = StreamRecorder(container.target)
    seen_by_peer = StreamRecorder(peer.target)
    try:
        seen_by_image.wait_until(lambda r: r.names() == {"from-checkout": "PEER_STATE_READY"}, 45, "image sees peer")
        seen_by_peer.wait_until(lambda r: r.names() == {"from-image": "PEER_STATE_READY"}, 45, "peer sees image")
        assert seen_by_image.kinds()[0] == "snapshot"
        assert dict(seen_by_peer.peers()["from-image"].labels)["role"] == "prefill"
    finally:
        seen_by_image.close()
        seen_by_peer.close()

    # SIGTERM (what the kubelet sends, through podman) ends it cleanly, and it deregisters.
    assert container.terminate() == 0, container.log_tail()
    wait_for(
        lambda: cluster.get_or_none(WORKER_METADATA.item(namespace, "from-image")) is None, 30, what="deregistration"
    )
