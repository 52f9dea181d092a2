"""The real SGLang Model Gateway fed by the sidecar, on the real control plane.

A gateway pod runs the sidecar (pod-label discovery, workers that run no sidecar) writing SMG's
worker manifest into a shared directory, and the real ``smg`` from PyPI reading it
(``--discovery-provider file``). Workers are stand-in HTTP servers on loopback addresses that the
tests also write as the pods' IPs. SMG's users' discovery bug reports are the steps: scale-up, a pod
turning unready, force deletion, graceful deletion, relabelling out of the selector, an IP change, a
restart under the same name with a new UID, PD roles with bootstrap ports. After each step SMG's
``/workers`` must equal the ground truth the test knows, and so must the manifest the sidecar wrote.
Stale workers keep answering SMG's health checks, so only discovery can remove them. With traffic: chat
completions through SMG during a graceful rolling replacement of every worker, none failing.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import yaml

from devcluster.cluster import ControlPlane, free_port
from devcluster.faults import FaultProxy
from devcluster.objects import Cluster
from devcluster.smg import MODEL, SmgGateway, StandInWorker
from devcluster.traffic import Load, chat_completion, failures
from devcluster.waiting import wait_for
from sidecar.app.config import load_settings
from sidecar.kube.settings import KubeSettings
from tests.conftest import MANIFESTS, POD_DISCOVERY_RBAC, Sidecars, kubectl

pytestmark = pytest.mark.integration
SELECTOR = "app=sglang-worker"
CONVERGE = 60.0  # SMG drains a removed worker for 5 s and probes a new one before it registers it
_addresses = (f"127.0.{a}.{b}" for a, b in itertools.product(range(60, 120), range(2, 250)))


class GatewayWorld:
    """One namespace: a gateway pod (sidecar + SMG sharing a directory) and worker pods with stand-ins."""

    def __init__(
        self,
        plane: ControlPlane,
        cluster: Cluster,
        namespace: str,
        sidecars: Sidecars,
        work_dir: pathlib.Path,
        roles: Mapping[str, str],
        pd: bool,
        server: str | None = None,
        epd: bool = False,
        smg_args: Sequence[str] = (),
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.port = free_port()  # every stand-in listens on its own address at this port
        self.stand_ins: list[StandInWorker] = []
        kubectl(plane, "apply", "-f", str(POD_DISCOVERY_RBAC), namespace=namespace)
        shared = work_dir / "shared"  # the pod's emptyDir
        shared.mkdir(parents=True)
        self.manifest = shared / "workers.json"
        gateway = cluster.start_pod(namespace, "gateway", {"app": "gateway"})
        env = {
            "DISCOVERY_SERVICE_NAME": "",
            "DISCOVERY_POD_SELECTOR": SELECTOR,
            "DISCOVERY_REQUIRE_METADATA": "false",
            "DISCOVERY_REGISTER": "never",  # as in manifests/components/smg/smg-gateway.yaml: the gateway only reads
            "DISCOVERY_WORKER_PORT": str(self.port),
            "DISCOVERY_SMG_MANIFEST": str(self.manifest),
            **roles,
        }
        self.sidecar = sidecars.start(gateway, "", extra_env=env, server=server).wait_ready()
        self.smg = SmgGateway.with_file(self.manifest, work_dir / "smg.log", pd=pd, epd=epd, extra=smg_args)

    def close(self) -> None:
        self.smg.stop()
        for worker in self.stand_ins:
            worker.stop()

    def serve(self, address: str, ports: tuple[int, ...] = ()) -> None:
        for port in ports or (self.port,):
            self.stand_ins.append(StandInWorker(address, port))

    def worker(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        ports: tuple[int, ...] = (),
        address: str = "",
        **annotations: str,
    ) -> str:
        """A ready worker pod at a fresh loopback address (or ``address``, already served), with stand-ins
        on its ports; returns the address."""
        if not address:
            address = next(_addresses)
            self.serve(address, ports)
        extra = dict(annotations)
        if ports:
            extra["smg.ai/worker-ports"] = ",".join(map(str, ports))
        self.cluster.start_pod(
            self.namespace, name, {"app": "sglang-worker", **(labels or {})}, ip=address, annotations=extra
        )
        return address

    def url(self, address: str, port: int | None = None) -> str:
        return f"http://{address}:{port or self.port}"

    # -- what each side has ----------------------------------------------------------------------------
    def manifest_workers(self) -> dict[str, dict[str, Any]]:
        try:
            return {w["url"]: w for w in json.loads(self.manifest.read_text())["workers"]}
        except FileNotFoundError:
            return {}

    def smg_workers(self) -> dict[str, dict[str, Any]]:
        return {w["url"]: w for w in self.smg.workers()}

    def converge(self, expected: Mapping[str, str], what: str) -> None:
        """SMG's /workers and the sidecar's manifest both equal ``expected`` (URL -> worker type)."""

        def roles(workers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
            return {url: str(w.get("worker_type", "regular")).lower() for url, w in workers.items()}

        try:
            wait_for(lambda: roles(self.manifest_workers()) == dict(expected), CONVERGE, what=f"manifest: {what}")
            wait_for(lambda: roles(self.smg_workers()) == dict(expected), CONVERGE, what=f"smg: {what}")
        except Exception as exc:
            raise AssertionError(
                f"{what}: expected {dict(expected)}\nmanifest {roles(self.manifest_workers())}\n"
                f"smg {roles(self.smg_workers())}\nsmg log:\n{self.smg.log_tail()}"
            ) from exc


@pytest.fixture
def regular(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars, tmp_path: pathlib.Path
) -> Iterator[GatewayWorld]:
    world = GatewayWorld(
        control_plane, cluster, namespace, sidecars, tmp_path, {"DISCOVERY_SMG_SELECTOR": SELECTOR}, pd=False
    )
    yield world
    world.close()


@pytest.fixture
def pd(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars, tmp_path: pathlib.Path
) -> Iterator[GatewayWorld]:
    roles = {
        "DISCOVERY_SMG_PREFILL_SELECTOR": "app=sglang-worker role=prefill",  # SMG's own flag spelling
        "DISCOVERY_SMG_DECODE_SELECTOR": "app=sglang-worker,role=decode",
    }
    world = GatewayWorld(control_plane, cluster, namespace, sidecars, tmp_path, roles, pd=True)
    yield world
    world.close()


def test_scale_up_unready_deletes_and_relabel(regular: GatewayWorld) -> None:
    """SMG follows scale-up (one pod with two worker ports), a pod turning unready and ready again, a
    graceful deletion (leaves at once), a force deletion, and a relabelling out of the selector."""
    w = regular
    w.converge({}, "synced, no workers")
    a = w.worker("w-a")
    b = w.worker("w-b")
    c_ports = (free_port(), free_port())
    c = w.worker("w-c", ports=c_ports)
    everyone = {w.url(a): "regular", w.url(b): "regular", w.url(c, c_ports[0]): "regular"}
    everyone[w.url(c, c_ports[1])] = "regular"
    w.converge(everyone, "scale-up to three pods, four workers")

    w.cluster.set_pod_status(w.namespace, "w-b", ready=False)
    without_b = {u: r for u, r in everyone.items() if a in u or c in u}
    w.converge(without_b, "w-b unready")
    w.cluster.set_pod_status(w.namespace, "w-b", ready=True)
    w.converge(everyone, "w-b ready again")

    w.cluster.delete_pod(w.namespace, "w-b", grace_seconds=300)  # terminating: SMG drops it at once
    w.converge(without_b, "w-b deleting")
    w.cluster.delete_pod(w.namespace, "w-a", grace_seconds=0)
    only_c = {u: r for u, r in everyone.items() if c in u}
    w.converge(only_c, "w-a force-deleted")
    w.cluster.relabel_pod(w.namespace, "w-c", {"app": "retired"})
    w.converge({}, "w-c relabelled out of the selector")


def test_ip_change_and_same_name_restart(regular: GatewayWorld) -> None:
    """A new IP replaces the old URL; a pod recreated under the same name with a new UID and address
    leaves no stale URL behind (the old stand-in still answers health checks)."""
    w = regular
    first = w.worker("w-r")
    w.converge({w.url(first): "regular"}, "w-r")

    moved = next(_addresses)
    w.serve(moved)
    w.cluster.set_pod_status(w.namespace, "w-r", ready=True, ip=moved)
    w.converge({w.url(moved): "regular"}, "w-r at its new IP")

    old_uid = w.cluster.get_or_none(f"/api/v1/namespaces/{w.namespace}/pods/w-r")["metadata"]["uid"]  # type: ignore[index]
    w.cluster.delete_pod(w.namespace, "w-r", grace_seconds=0)
    wait_for(lambda: w.cluster.get_or_none(f"/api/v1/namespaces/{w.namespace}/pods/w-r") is None, 30)
    again = w.worker("w-r")
    new = w.cluster.get_or_none(f"/api/v1/namespaces/{w.namespace}/pods/w-r")
    assert new is not None and new["metadata"]["uid"] != old_uid
    w.converge({w.url(again): "regular"}, "the new incarnation only")

    # Restarted again at the very same address: the URL is unchanged, but SMG must know the worker is a
    # new incarnation (re-probed, as its own discovery does by pod UID): its discovery id follows the UID.
    w.cluster.delete_pod(w.namespace, "w-r", grace_seconds=0)
    wait_for(lambda: w.cluster.get_or_none(f"/api/v1/namespaces/{w.namespace}/pods/w-r") is None, 30)
    w.worker("w-r", address=again)
    third = w.cluster.get_or_none(f"/api/v1/namespaces/{w.namespace}/pods/w-r")
    assert third is not None
    discovery_id = f"{third['metadata']['uid']}:{w.port}"
    wait_for(
        lambda: w.smg_workers().get(w.url(again), {}).get("labels", {}).get("smg.ai/discovery-id") == discovery_id,
        CONVERGE,
        what="SMG's worker to be the third incarnation",
    )
    assert set(w.smg_workers()) == {w.url(again)}


@pytest.fixture
def round_robin(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars, tmp_path: pathlib.Path
) -> Iterator[GatewayWorld]:
    """``regular``, with SMG routing round-robin (its default policy keeps a prompt on one worker)."""
    roles = {"DISCOVERY_SMG_SELECTOR": SELECTOR}
    world = GatewayWorld(
        control_plane, cluster, namespace, sidecars, tmp_path, roles, pd=False, smg_args=["--policy", "round_robin"]
    )
    yield world
    world.close()


def test_no_request_fails_through_a_graceful_rolling_replacement(round_robin: GatewayWorld) -> None:
    """Chat completions through SMG fed by the sidecar while every worker is replaced as a Deployment replaces
    it: a new pod Ready, then the old one deleted, its engine serving until SMG has let go of it (a graceful
    drain), then stopped. No request fails, and every new worker takes traffic. (Figures, against SMG's own
    discovery, are ``python -m bench.smg_traffic``'s.)"""
    w = round_robin
    old = {name: w.worker(name) for name in ("w-0", "w-1", "w-2")}
    w.converge({w.url(a): "regular" for a in old.values()}, "three workers")
    load = Load(lambda: chat_completion(w.smg.port, MODEL, content="test"), clients=2, pause=0.01, max_seconds=180)
    load.start().wait_for_more(20)
    new: dict[str, str] = {}
    try:
        for name, address in old.items():
            new[f"{name}-b"] = w.worker(f"{name}-b")
            w.cluster.delete_pod(w.namespace, name, grace_seconds=300)  # terminating; its engine still serves
            wait_for(lambda a=address: w.url(a) not in w.smg_workers(), CONVERGE, what=f"SMG to let go of {name}")
            next(s for s in w.stand_ins if s.host == address).stop()  # the grace period ends: the engine exits
            w.cluster.delete_pod(w.namespace, name, grace_seconds=0)
            load.wait_for_more(10)
        w.converge({w.url(a): "regular" for a in new.values()}, "the three new workers only")
        load.wait_for_more(20)
    finally:
        outcomes = load.stop()
    assert not failures(outcomes), f"{failures(outcomes)} of {len(outcomes)} requests failed\n{w.smg.log_tail()}"
    served = {s.host: len(s.served) for s in w.stand_ins}
    assert all(served[a] > 0 for a in new.values()), f"a new worker never took traffic: {served}"


@pytest.fixture
def epd(
    control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars, tmp_path: pathlib.Path
) -> Iterator[GatewayWorld]:
    roles = {
        "DISCOVERY_SMG_ENCODE_SELECTOR": "role=encode",
        "DISCOVERY_SMG_PREFILL_SELECTOR": "role in (prefill,encode)",  # encode pods match this one too
        "DISCOVERY_SMG_DECODE_SELECTOR": "role=decode",
    }
    world = GatewayWorld(control_plane, cluster, namespace, sidecars, tmp_path, roles, pd=False, epd=True)
    yield world
    world.close()


def test_epd_roles_in_smgs_order(epd: GatewayWorld) -> None:
    """SMG's --epd-disaggregation: a pod matching the encode and the prefill selectors is an encode
    worker (SMG's order: encode, prefill, decode), with its bootstrap port."""
    w = epd
    e = w.worker("encode-0", {"role": "encode"}, **{"sglang.ai/bootstrap-port": "9000"})
    p = w.worker("prefill-0", {"role": "prefill"}, **{"sglang.ai/bootstrap-port": "9001"})
    d = w.worker("decode-0", {"role": "decode"})
    w.converge({w.url(e): "encode", w.url(p): "prefill", w.url(d): "decode"}, "encode, prefill, decode")
    assert w.smg_workers()[w.url(e)].get("bootstrap_port") == 9000


def test_pd_roles_with_bootstrap_ports(pd: GatewayWorld) -> None:
    """Prefill and decode workers in their roles (SMG --pd-disaggregation), prefill with its bootstrap
    port; a pod relabelled from decode to prefill changes role in SMG; a pod in no role is left out."""
    w = pd
    p = w.worker("prefill-0", {"role": "prefill"}, **{"sglang.ai/bootstrap-port": "8998"})
    ports = (free_port(), free_port())
    p2 = w.worker("prefill-1", {"role": "prefill"}, ports=ports, **{"sglang.ai/bootstrap-port": "9001,9002"})
    d = w.worker("decode-0", {"role": "decode"}, **{"sglang.ai/bootstrap-port": "7777"})
    w.worker("other-0", {"role": "router"})
    expected = {
        w.url(p): "prefill",
        w.url(p2, ports[0]): "prefill",
        w.url(p2, ports[1]): "prefill",
        w.url(d): "decode",
    }
    w.converge(expected, "two prefill pods (three workers), one decode")
    smg = w.smg_workers()
    assert smg[w.url(p)].get("bootstrap_port") == 8998
    assert [smg[w.url(p2, port)].get("bootstrap_port") for port in ports] == [9001, 9002]
    assert smg[w.url(d)].get("bootstrap_port") is None  # a decode worker has none, as SMG reads it

    w.cluster.relabel_pod(w.namespace, "decode-0", {"role": "prefill"})
    w.converge({**expected, w.url(d): "prefill"}, "decode-0 relabelled to prefill")
    assert w.smg_workers()[w.url(d)].get("bootstrap_port") == 7777


def api_connected(sidecar: Any) -> float:
    """The sidecar's ``discovery_api_connected`` gauge: 0 while its stream is DEGRADED."""
    _, text = sidecar.http_get("/metrics")
    (value,) = [line.split()[1] for line in text.splitlines() if line.startswith("discovery_api_connected ")]
    return float(value)


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[FaultProxy]:
    p = FaultProxy(control_plane.apiserver_port)
    yield p
    p.close()


def test_the_last_good_manifest_stays_while_the_api_server_is_lost(
    control_plane: ControlPlane,
    cluster: Cluster,
    namespace: str,
    sidecars: Sidecars,
    tmp_path: pathlib.Path,
    proxy: FaultProxy,
) -> None:
    """The gateway's sidecar loses the API server: SMG keeps routing to the last known workers (the file
    is neither emptied nor rewritten); once the server is back, the changes made meanwhile arrive."""
    w = GatewayWorld(
        control_plane,
        cluster,
        namespace,
        sidecars,
        tmp_path,
        {"DISCOVERY_SMG_SELECTOR": SELECTOR},
        pd=False,
        server=proxy.server,
    )
    try:
        a, b = w.worker("w-a"), w.worker("w-b")
        both = {w.url(a): "regular", w.url(b): "regular"}
        w.converge(both, "two workers")
        before = w.manifest.stat().st_mtime_ns, w.manifest.read_text()

        proxy.refuse()
        # The gateway stays ready (it serves from the file it holds); the stream is DEGRADED and the file held.
        wait_for(lambda: api_connected(w.sidecar) == 0, 60, what="the sidecar to notice the outage")
        assert w.sidecar.http_get("/readyz")[0] == 200
        w.cluster.delete_pod(w.namespace, "w-b", grace_seconds=0)  # unseen by the sidecar for now
        assert (w.manifest.stat().st_mtime_ns, w.manifest.read_text()) == before
        assert set(w.smg_workers()) == set(both)

        proxy.accept()
        w.converge({w.url(a): "regular"}, "the deletion made during the outage")
    finally:
        w.close()


EXAMPLE = MANIFESTS / "components" / "smg" / "smg-gateway.yaml"


def test_example_manifest_is_accepted_and_consistent(
    control_plane: ControlPlane, namespace: str, tmp_path: pathlib.Path
) -> None:
    """The example runs: the API server admits it (server-side dry run), the sidecar's loader accepts its
    environment, SMG reads the very file the sidecar writes, on a volume both mount, and the real smg
    binary starts with the example's arguments."""
    kubectl(control_plane, "apply", "--dry-run=server", "-f", str(EXAMPLE), namespace=namespace)
    (deployment,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    spec = deployment["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    (smg,) = spec["containers"]
    env = {e["name"]: e.get("value", "") for e in sidecar["env"]}
    manifest = pathlib.PurePosixPath(env["DISCOVERY_SMG_MANIFEST"])
    args = smg["args"]
    assert args[args.index("--discovery-file") + 1] == str(manifest)
    assert "--pd-disaggregation" in args  # prefill/decode roles need SMG's PD mode
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, smg)}
    shared = [v for v, path in mounts["discovery-sidecar"].items() if path == str(manifest.parent)]
    assert len(shared) == 1 and mounts["smg"].get(shared[0]) == str(manifest.parent)

    local = tmp_path / "shared" / manifest.name  # the emptyDir, here
    local.parent.mkdir()
    env.update(POD_NAME="smg-gateway-0", POD_NAMESPACE=namespace, POD_UID="u", DISCOVERY_SMG_MANIFEST=str(local))
    settings = load_settings(environ={**env, "DISCOVERY_PODINFO_DIR": str(tmp_path / "none")})
    assert settings.smg_manifest is not None and isinstance(settings.backend_settings, KubeSettings)
    assert settings.backend_settings.require_metadata is False
    assert settings.register == "never"
    assert settings.smg_manifest.roles.role({"app": "sglang-worker", "role": "prefill"}) == "prefill"

    flags = [a for a in args[1:] if a not in ("--host", "0.0.0.0", "--port", "30000")]
    flags[flags.index("--discovery-file") + 1] = str(local)
    gateway = SmgGateway(flags, tmp_path / "smg.log")  # waits until it serves /workers
    try:
        assert gateway.workers() == []
    finally:
        gateway.stop()
